//! Runtime pieces the agent and the scaler share, kept out of
//! `gpuscale-core` because they read a clock:
//!
//! * [`Clock`]: wall-clock time that advances with tokio's clock, so paused
//!   tokio time in tests moves it exactly as the test does, and a simulation
//!   can run it faster than real time.

mod clock;

pub use clock::Clock;
