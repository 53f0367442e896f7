//! The place of the L7 + mutual TLS mode ([`Mode::MeshedMtls`]): the
//! meshed phases again, with issue 9's transport between the agents.
//!
//! Running it needs what the agent does not have yet: a `nodemesh ca` in a
//! netns of its own on the fabric, a credential per node from `nodemesh ca
//! issue-node`, and agents started with `--ca-address` and
//! `--node-credential`. Until then every round skips the mode and says why.
//!
//! [`Mode::MeshedMtls`]: super::Mode::MeshedMtls

use std::path::Path;
use std::process::Command;

/// Why the mode cannot run with this agent binary.
pub(super) fn unavailable(nodemesh: &Path) -> String {
    let help = crate::output_ok(Command::new(nodemesh).args(["agent", "--help"]));
    match help {
        Some(help) if help.contains("--ca-address") => format!(
            "{} supports --ca-address, but the bench does not start `nodemesh ca` and issue \
             node credentials yet (xtask/src/bench/mtls.rs)",
            nodemesh.display()
        ),
        Some(_) => format!(
            "{} has no --ca-address yet: the agents cannot talk mutual TLS",
            nodemesh.display()
        ),
        None => format!("`{} agent --help` failed", nodemesh.display()),
    }
}
