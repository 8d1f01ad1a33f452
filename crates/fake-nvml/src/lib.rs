//! A fake `libnvidia-ml.so.1`.
//!
//! Exports the NVML C symbols the agent calls, with values and errors read
//! from a JSON file, so that tests exercise the real `nvml-wrapper` code path.
