#![no_std]
// The programs are in main.rs; this empty library lets the agent's build script
// depend on this crate so cargo rebuilds the agent when the programs change.
