//! `accessLogging[].filter.expression`: the subset of CEL that access-log
//! filters use in practice, comparisons of `response.code` joined by `&&`
//! and `||` (`response.code >= 400`, `response.code >= 500 ||
//! response.code == 429`). Anything else is refused when the Telemetry is
//! loaded, never ignored: a filter that silently matched everything (or
//! nothing) would log what its author meant to keep out, or lose what they
//! meant to see.

use std::fmt;

/// A parsed filter: any of its groups holds when all of its comparisons do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    any: Box<[Box<[Comparison]>]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Comparison {
    op: Op,
    value: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, left: u16, right: u16) -> bool {
        match self {
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
            Op::Eq => left == right,
            Op::Ne => left != right,
        }
    }
}

/// Why an expression is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; nodemesh supports comparisons of response.code with an integer (<, <=, >, >=, \
             ==, !=) joined by && and ||, e.g. \"response.code >= 400\"",
            self.0
        )
    }
}

const ATTRIBUTE: &str = "response.code";

impl Filter {
    pub fn parse(expression: &str) -> Result<Filter, Unsupported> {
        let mut any = Vec::new();
        for alternative in expression.split("||") {
            let all: Result<Vec<_>, _> = alternative.split("&&").map(comparison).collect();
            any.push(all?.into_boxed_slice());
        }
        Ok(Filter {
            any: any.into_boxed_slice(),
        })
    }

    /// Whether a request answered with `code` is logged.
    pub fn matches(&self, code: u16) -> bool {
        self.any
            .iter()
            .any(|all| all.iter().all(|c| c.op.holds(code, c.value)))
    }
}

fn comparison(text: &str) -> Result<Comparison, Unsupported> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Unsupported("an empty operand of && or ||".into()));
    }
    let Some(rest) = text.strip_prefix(ATTRIBUTE) else {
        let attribute: String = text
            .chars()
            .take_while(|c| !c.is_whitespace() && !"<>=!&|()".contains(*c))
            .collect();
        return Err(Unsupported(match attribute.is_empty() {
            true => format!("{text:?} is not a comparison"),
            false => format!("attribute {attribute:?} is not supported"),
        }));
    };
    let rest = rest.trim_start();
    let ops = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let Some((op, value)) = ops
        .iter()
        .find_map(|(token, op)| rest.strip_prefix(token).map(|v| (*op, v.trim())))
    else {
        return Err(Unsupported(format!("{text:?} has no comparison operator")));
    };
    let value = value.parse::<u16>().map_err(|_| {
        Unsupported(format!(
            "{value:?} in {text:?} is not an integer status code"
        ))
    })?;
    Ok(Comparison { op, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_response_codes() {
        let errors = Filter::parse("response.code >= 400").unwrap();
        assert!(errors.matches(404) && errors.matches(503));
        assert!(!errors.matches(200) && !errors.matches(399));
        let either = Filter::parse("response.code>=500 || response.code == 429").unwrap();
        assert!(either.matches(429) && either.matches(500) && !either.matches(404));
        let range = Filter::parse("response.code >= 400 && response.code < 500").unwrap();
        assert!(range.matches(404) && !range.matches(500) && !range.matches(200));
        let not_ok = Filter::parse("response.code != 200").unwrap();
        assert!(not_ok.matches(0) && !not_ok.matches(200));
    }

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        for (expression, says) in [
            (
                "request.headers['x'] == 'y'",
                "attribute \"request.headers['x']\"",
            ),
            ("response.code >= four", "is not an integer status code"),
            ("response.code in [500]", "has no comparison operator"),
            ("response.code >= 400 ||", "an empty operand"),
            ("(response.code >= 400)", "is not a comparison"),
            ("response.duration > 10", "attribute \"response.duration\""),
        ] {
            let error = Filter::parse(expression).unwrap_err().to_string();
            assert!(error.contains(says), "{expression}: {error}");
            assert!(error.contains("response.code >= 400"), "{error}");
        }
    }
}
