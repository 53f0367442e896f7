//! Cleanups that run once this test process has exited, however it ended.
//!
//! `Drop` does not run when a signal ends the process: CI's time limit, a
//! ^C, the OOM killer's SIGKILL. A topology left behind keeps its network
//! namespaces, its processes and its agents' pinned eBPF links (which keep
//! the programs attached), and the API server keeps 60 MB of etcd data.
//!
//! So each test process starts one watchdog (`bash`, in a process group of
//! its own so that a ^C reaches only the test) and writes registrations to
//! it on a pipe. The pipe reaches end of file only when the last copy of its
//! write end closes, that is when the process is gone (the end is
//! close-on-exec, so no child holds it). The watchdog then runs every
//! cleanup still registered, newest first. An owner that cleaned up itself
//! withdraws its cleanup, so nothing runs twice and nothing touches a name
//! reused since.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Reads `+ID COMMAND` (register) and `-ID` (withdraw) lines until end of
/// file, then evaluates the commands still registered, newest first.
const WATCHDOG: &str = r#"trap '' HUP INT
cleanups=
while IFS= read -r line; do
  case $line in
    +*) cleanups="${line#+}"$'\n'"$cleanups" ;;
    -*) cleanups=$(grep -v "^${line#-} " <<<"$cleanups") ;;
  esac
done
while IFS= read -r cleanup; do
  [ -n "$cleanup" ] && (eval "${cleanup#* }")
done <<<"$cleanups"
"#;

/// A registered cleanup; [`withdraw`](Self::withdraw) it once its owner has
/// cleaned up. Dropping it keeps it registered.
pub struct ExitCleanup {
    id: u64,
}

impl ExitCleanup {
    /// Runs `cmd` (a program and its arguments) after this process has
    /// exited, unless withdrawn before. Its stdout is discarded; its stderr
    /// is the test's.
    pub fn register(cmd: &[&str]) -> Result<ExitCleanup> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut line = format!("+{id}");
        for arg in cmd {
            line.push(' ');
            line.push_str(&bash_quote(arg));
        }
        line.push_str(" >/dev/null");
        send(&line).with_context(|| format!("registering the exit cleanup `{}`", cmd.join(" ")))?;
        Ok(ExitCleanup { id })
    }

    /// Withdraws the cleanup: its owner has done it.
    pub fn withdraw(self) {
        if let Err(e) = send(&format!("-{}", self.id)) {
            eprintln!("withdrawing an exit cleanup: {e:#}");
        }
    }
}

/// Writes one line to this process's watchdog, started on first use.
fn send(line: &str) -> Result<()> {
    static WATCHDOG_STDIN: OnceLock<Result<Mutex<ChildStdin>, String>> = OnceLock::new();
    let stdin = WATCHDOG_STDIN.get_or_init(|| {
        start_watchdog()
            .map(Mutex::new)
            .map_err(|e| format!("{e:#}"))
    });
    let stdin = match stdin {
        Ok(stdin) => stdin,
        Err(e) => bail!("{e}"),
    };
    let mut stdin = stdin.lock().unwrap_or_else(|e| e.into_inner());
    writeln!(stdin, "{line}").context("the exit-cleanup watchdog is gone")?;
    stdin.flush()?;
    Ok(())
}

fn start_watchdog() -> Result<ChildStdin> {
    let mut child = Command::new("bash")
        .args(["-c", WATCHDOG, "nodemesh-testbed-exit-cleanup"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the exit-cleanup watchdog (bash)")?;
    child.stdin.take().context("the watchdog has no stdin")
}

/// `arg` as one bash word: `$'…'`, which also carries newlines on the
/// watchdog's one line per registration.
fn bash_quote(arg: &str) -> String {
    let mut quoted = String::with_capacity(arg.len() + 3);
    quoted.push_str("$'");
    for c in arg.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("\\'"),
            '\n' => quoted.push_str("\\n"),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::bash_quote;
    use std::process::Command;

    #[test]
    fn quoted_words_reach_bash_unchanged() {
        let words = [
            "plain",
            "two words",
            "it's",
            "back\\slash",
            "line\nbreak",
            "$HOME `x`",
        ];
        let line: Vec<String> = words.iter().map(|w| bash_quote(w)).collect();
        let out = Command::new("bash")
            .args(["-c", &format!("printf '%s\\0' {}", line.join(" "))])
            .output()
            .unwrap();
        let got: Vec<&str> = std::str::from_utf8(&out.stdout)
            .unwrap()
            .split_terminator('\0')
            .collect();
        assert_eq!(got, words);
    }
}
