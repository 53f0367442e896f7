//! YAML text → one untyped value per document, within the [`Limits`] of a load.
//!
//! The parser is serde-saphyr (pure Rust, no `unsafe`), which enforces nesting and size
//! budgets while it parses, so a hostile document is refused after reading at most
//! [`Limits::depth`] levels or [`Limits::document_nodes`] nodes instead of being parsed
//! whole. Scalars are resolved as YAML 1.2 (and like serde_yaml before it): `yes`, `on`,
//! `0755` and `1_000` are strings.

use std::borrow::Cow;
use std::ops::ControlFlow;

use serde_json::Value;
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::{Error, MessageFormatter, UserMessageFormatter};

use super::Limits;

/// Calls `each` with every non-empty document of `text`, in order, until it breaks.
///
/// Stops at the first syntax error (`invalid YAML: …`) or exceeded limit, since the parser
/// cannot resynchronize after one, and returns its message (with line and column).
pub(super) fn for_each_document(
    text: &str,
    limits: &Limits,
    mut each: impl FnMut(Value) -> ControlFlow<()>,
) -> Result<(), String> {
    let mut input = text.as_bytes();
    // The streaming reader applies the budget to each document on its own and keeps only
    // the current one in memory.
    for document in serde_saphyr::read_with_options(&mut input, options(limits)) {
        let document = document.map_err(|e| {
            let message = e.render_with_formatter(&Messages(limits));
            if is_limit(&e) {
                message
            } else {
                format!("invalid YAML: {message}")
            }
        })?;
        if each(document).is_break() {
            break;
        }
    }
    Ok(())
}

/// Characters the scanner may read ahead of the parser (serde-saphyr's default).
const SIMPLE_KEY_LOOKAHEAD: usize = 1024;

fn options(limits: &Limits) -> serde_saphyr::Options {
    let nodes = limits.document_nodes;
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(limits.file_bytes),
            max_depth: limits.depth,
            // Deep flow collections (`[[[[…`) must report the depth limit too, rather
            // than the parser's own one, which its lookahead reaches first.
            flow_nesting_limit: limits.depth + SIMPLE_KEY_LOOKAHEAD + 1,
            simple_key_max_lookahead: SIMPLE_KEY_LOOKAHEAD,
            max_nodes: nodes,
            // Every node is one event, every collection one more for its end.
            max_events: nodes.saturating_mul(2).saturating_add(16),
            max_total_scalar_bytes: limits.file_bytes,
        },
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
    }
}

fn is_limit(error: &Error) -> bool {
    matches!(
        error,
        Error::Budget { .. }
            | Error::AliasReplayLimitExceeded { .. }
            | Error::AliasExpansionLimitExceeded { .. }
            | Error::AliasReplayStackDepthExceeded { .. }
    )
}

/// serde-saphyr's user-facing messages, with the load's own limits named.
struct Messages<'a>(&'a Limits);

impl MessageFormatter for Messages<'_> {
    fn format_message<'a>(&self, err: &'a Error) -> Cow<'a, str> {
        let Error::Budget { breach, .. } = err else {
            return UserMessageFormatter.format_message(err);
        };
        let limits = self.0;
        Cow::Owned(match breach {
            BudgetBreach::Depth { .. } => format!(
                "document nested deeper than the limit of {} levels of mappings and sequences",
                limits.depth
            ),
            BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => format!(
                "document larger than the limit of {} YAML nodes (mappings, sequences, scalars)",
                limits.document_nodes
            ),
            BudgetBreach::ScalarBytes { .. } | BudgetBreach::InputBytes { .. } => {
                format!("file larger than the limit of {} bytes", limits.file_bytes)
            }
            other => format!("document too large or too complex ({other:?})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use serde_json::{json, Value};

    use super::super::Limits;
    use super::for_each_document;

    fn documents(text: &str, limits: &Limits) -> Result<Vec<Value>, String> {
        let mut all = Vec::new();
        for_each_document(text, limits, |d| {
            all.push(d);
            ControlFlow::Continue(())
        })
        .map(|()| all)
    }

    #[test]
    fn resolves_scalars_as_yaml_1_2() {
        let text = "a: yes\nb: on\nc: 0755\nd: 1_000\ne: 80\nf: true\ng: ~\nh: '80'\ni: 1.5\n";
        let expected = json!({
            "a": "yes", "b": "on", "c": "0755", "d": "1_000", "e": 80, "f": true, "g": null,
            "h": "80", "i": 1.5
        });
        assert_eq!(documents(text, &Limits::default()).unwrap(), [expected]);
    }

    #[test]
    fn skips_empty_documents_and_expands_aliases_and_merge_keys() {
        let text = "---\n---\nbase: &b {x: 1}\nuse: {<<: *b, y: 2}\n---\n# only a comment\n";
        let docs = documents(text, &Limits::default()).unwrap();
        assert_eq!(docs, [json!({"base": {"x": 1}, "use": {"x": 1, "y": 2}})]);
    }

    #[test]
    fn refuses_deep_nesting_quickly() {
        let limits = Limits::default();
        // Both the flow and the block forms; 100 000 levels took serde_yaml ~40 s of CPU.
        let flow = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let block: String = (0..2_000)
            .map(|i| format!("{}k:\n", " ".repeat(i)))
            .collect();
        for text in [flow, block] {
            let error = documents(&text, &limits).unwrap_err();
            assert!(
                error.starts_with(&format!(
                    "document nested deeper than the limit of {} levels",
                    limits.depth
                )),
                "{error}"
            );
            assert!(error.contains("line "), "{error}");
        }
        let at_limit = format!("{}{}", "[".repeat(limits.depth), "]".repeat(limits.depth));
        assert_eq!(documents(&at_limit, &limits).unwrap().len(), 1);
    }

    #[test]
    fn refuses_documents_with_too_many_nodes() {
        let limits = Limits {
            document_nodes: 1_000,
            ..Limits::default()
        };
        let small = format!("[{}]", vec!["1"; 998].join(","));
        let large = format!("[{}]", vec!["1"; 1_000].join(","));
        // The budget is per document: many small ones are fine.
        let many = [small.as_str(); 5].join("\n---\n");
        assert_eq!(documents(&many, &limits).unwrap().len(), 5);
        let error = documents(&large, &limits).unwrap_err();
        assert!(
            error.starts_with("document larger than the limit of 1000 YAML nodes"),
            "{error}"
        );
    }

    #[test]
    fn refuses_alias_bombs() {
        let mut text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let error = documents(&text, &Limits::default()).unwrap_err();
        assert!(error.contains("too large or too complex"), "{error}");
    }

    #[test]
    fn reports_syntax_errors_with_their_position() {
        let error = documents("a: 1\nb: [\n", &Limits::default()).unwrap_err();
        assert!(error.starts_with("invalid YAML: "), "{error}");
        assert!(error.contains("line 2"), "{error}");
        let error = documents("a: 1\na: 2\n", &Limits::default()).unwrap_err();
        assert!(
            error.starts_with("invalid YAML: duplicate mapping key `a`"),
            "{error}"
        );
    }
}
