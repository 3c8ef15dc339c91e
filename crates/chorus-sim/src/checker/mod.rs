//! Checkers of simulated histories. Each capability adds its own module here.

pub mod linearizability;
