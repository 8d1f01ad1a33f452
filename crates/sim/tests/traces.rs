//! Trace readers: formats detected, malformed rows reported with file,
//! line and column, and the bundled traces read as documented.

use std::io::Write;
use std::path::{Path, PathBuf};

use gpuscale_sim::trace::{Trace, TraceFormat, Workload, WorkloadOptions, read_trace};

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    p
}

fn err(path: &Path, format: Option<TraceFormat>) -> String {
    read_trace(path, format).expect_err("must fail").to_string()
}

#[test]
fn a_bad_azure_token_count_names_file_line_and_column() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = file(
        &d,
        "code.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n\
         2023-11-16 18:17:03.9799600,4808,10\n\
         2023-11-16 18:17:04.0319600,31x0,8\n",
    );
    let e = err(&p, None);
    // Line 3; the field starts after "2023-11-16 18:17:04.0319600," (28 chars).
    assert!(e.contains("code.csv:3:29:"), "{e}");
    assert!(e.contains("ContextTokens") && e.contains("31x0"), "{e}");
}

#[test]
fn a_bad_azure_timestamp_and_a_missing_column_are_reported() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = file(
        &d,
        "t.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-16 18:17:03,1,1\n",
    );
    let e = err(&p, None);
    assert!(e.contains("t.csv:2:1:") && e.contains("TIMESTAMP"), "{e}");
    let p = file(
        &d,
        "m.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,12\n",
    );
    let e = err(&p, None);
    assert!(
        e.contains("m.csv:2:") && e.contains("GeneratedTokens"),
        "{e}"
    );
}

#[test]
fn a_bad_jsonl_line_names_the_line_and_the_field() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = file(
        &d,
        "t.jsonl",
        "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [1, 2]}\n\
         \n\
         {\"timestamp\": 27, \"input_length\": 10}\n",
    );
    let e = err(&p, None);
    assert!(e.contains("t.jsonl:3:"), "{e}");
    assert!(e.contains("output_length"), "{e}");
    let p = file(
        &d,
        "n.jsonl",
        "{\"timestamp\": 0, \"input_length\": -4, \"output_length\": 5}\n",
    );
    let e = err(&p, None);
    assert!(
        e.contains("n.jsonl:1:18:") && e.contains("input_length"),
        "{e}"
    );
}

#[test]
fn a_rate_series_row_must_increase_and_be_numeric() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = file(
        &d,
        "r.csv",
        "window_start_s,total_rate_rps\n0,1.5\n600,abc\n",
    );
    let e = err(&p, None);
    assert!(
        e.contains("r.csv:3:5:") && e.contains("total_rate_rps"),
        "{e}"
    );
    let p = file(&d, "s.csv", "window_start_s,total_rate_rps\n600,1\n0,2\n");
    let e = err(&p, None);
    assert!(e.contains("s.csv:3:1:") && e.contains("increase"), "{e}");
}

#[test]
fn an_unknown_format_says_what_is_allowed() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = file(&d, "x.txt", "hello,world\n1,2\n");
    let e = err(&p, None);
    assert!(
        e.contains("--trace-format") && e.contains("azure, jsonl, rate"),
        "{e}"
    );
    let e = TraceFormat::parse("parquet")
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("--trace-format") && e.contains("parquet"), "{e}");
}

#[test]
fn the_bundled_traces_read_as_documented() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/traces");
    let Trace::Requests { requests, .. } =
        read_trace(&data.join("AzureLLMInferenceTrace_code.csv"), None).expect("code")
    else {
        panic!("requests expected")
    };
    assert_eq!(requests.len(), 8819);
    let span = requests.last().map_or(0.0, |r| r.arrival_s) / 60.0;
    assert!((span - 57.3).abs() < 0.1, "{span} min");
    let Trace::Rate { windows, .. } =
        read_trace(&data.join("servegen_m-large_rate_10min.csv"), None).expect("servegen")
    else {
        panic!("rate series expected")
    };
    assert_eq!(windows.len(), 2016);
    assert!(windows.iter().all(|w| w.len_s == 600.0));
    let peak = windows.iter().map(|w| w.rate_rps).fold(0.0, f64::max);
    assert!((peak - 583.0).abs() < 1.0, "{peak}");
    // Time scaling stretches the trace; rate scaling keeps its length.
    let tr = read_trace(&data.join("AzureLLMInferenceTrace_conv.csv"), None).expect("conv");
    let w = Workload::new(
        &tr,
        None,
        &WorkloadOptions {
            time_scale: 2.0,
            ..Default::default()
        },
    )
    .expect("workload");
    assert!((w.duration_s() / 60.0 - 2.0 * 58.4).abs() < 0.5);
}
