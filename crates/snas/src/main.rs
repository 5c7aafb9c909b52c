//! `snas`: the one binary. It only parses the command line and wires the library crates together.
fn main() {}
