//! `nodemesh top`: the busiest edges, refreshed every two seconds (the
//! screen is cleared only on a terminal); `--once` prints one frame.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use super::graph::{calls, Call};
use super::{fetch, VizError, FIGURE_HEADERS};
use crate::cli::table;

pub const REFRESH: Duration = Duration::from_secs(2);

pub struct Top {
    pub sockets: Vec<PathBuf>,
    pub window: Duration,
    /// Rows shown at most.
    pub limit: usize,
    pub once: bool,
}

impl Top {
    pub fn run(&self) -> Result<(), VizError> {
        let terminal = std::io::stdout().is_terminal();
        loop {
            let edges = fetch(&self.sockets, self.window)?;
            if terminal {
                // Clear the screen and go home.
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "nodemesh top: busiest calls over the last {:.0}s (from {} agent(s))\n",
                edges.seconds,
                self.sockets.len()
            );
            frame(&calls(&edges), self.limit);
            if self.once {
                return Ok(());
            }
            std::thread::sleep(REFRESH);
        }
    }
}

fn frame(calls: &[Call], limit: usize) {
    let headers: Vec<&str> = ["FROM", "TO"].into_iter().chain(FIGURE_HEADERS).collect();
    table(
        &headers,
        calls.iter().take(limit).map(|c| {
            let mut cells = vec![c.from.clone(), c.to.clone()];
            cells.extend(c.figures.cells());
            cells
        }),
    );
}
