//! `gpuscale sim` end to end through its argument parser: a JSONL trace in,
//! the JSON report (one object per policy, the documented fields), the
//! chart and the decision log out; bad flags are usage errors that name the
//! flag.

use std::path::Path;

use clap::Parser;
use gpuscale_sim::cli::{SimArgs, run};
use serde_json::Value;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

fn args(list: &[&str]) -> SimArgs {
    let mut argv = vec!["sim"];
    argv.extend_from_slice(list);
    Cli::try_parse_from(argv).expect("flags parse").args
}

/// Five minutes at about 4 requests/s, with a burst in the middle.
fn write_trace(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    let mut t_ms = 0u64;
    let mut i = 0u64;
    while t_ms < 300_000 {
        let gap = if (120_000..150_000).contains(&t_ms) {
            60
        } else {
            250
        };
        text.push_str(&format!(
            "{{\"timestamp\": {t_ms}, \"input_length\": {}, \"output_length\": {}, \"model\": \"x\"}}\n",
            200 + (i * 37) % 900,
            20 + (i * 13) % 200
        ));
        t_ms += gap;
        i += 1;
    }
    let path = dir.join("trace.jsonl");
    std::fs::write(&path, text).expect("the temporary directory is writable");
    path
}

#[test]
fn a_jsonl_trace_gives_one_json_report_per_policy_with_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_trace(dir.path());
    let out = dir.path().join("report.json");
    let chart = dir.path().join("chart.svg");
    let log = dir.path().join("decisions.jsonl");
    run(args(&[
        "--trace",
        trace.to_str().unwrap(),
        "--policy",
        "gpuscale,lower-bound,static,keda-waiting",
        "--bound-targets",
        "0.9,1",
        "--report",
        "json",
        "--out",
        out.to_str().unwrap(),
        "--chart",
        chart.to_str().unwrap(),
        "--decision-log",
        log.to_str().unwrap(),
        "--jobs",
        "1",
    ]))
    .expect("the run succeeds");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = report.as_array().expect("a list");
    let policies: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(rows.len(), 5, "{policies:?}");
    assert!(policies.contains(&"gpuscale") && policies.contains(&"lower-bound"));
    for r in rows {
        for field in [
            "policy",
            "slo_attainment",
            "ttft_p50_s",
            "ttft_p95_s",
            "ttft_p99_s",
            "itl_p95_s",
            "gpu_hours",
            "attainable_ceiling",
            "ttft_attainment",
            "tpot_attainment",
            "gpu_hours_vs_lower_bound",
            "scale_events",
            "oscillations",
            "requests_dropped",
            "max_queue",
        ] {
            assert!(r.get(field).is_some(), "{} lacks {field}", r["policy"]);
        }
        let a = r["slo_attainment"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
        assert!(r["gpu_hours"].as_f64().unwrap() > 0.0);
        assert_eq!(
            r["requests"].as_u64().unwrap(),
            rows[0]["requests"].as_u64().unwrap()
        );
    }
    for bound in rows.iter().filter(|r| r["policy"] == "lower-bound") {
        assert!((bound["gpu_hours_vs_lower_bound"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    }
    for r in rows {
        let ceiling = r["attainable_ceiling"].as_f64().unwrap();
        assert!(r["slo_attainment"].as_f64().unwrap() <= ceiling + 1e-12);
        assert!(r["gpu_hours_vs_lower_bound"].as_f64().is_some());
    }
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("gpuscale"));
    let first = std::fs::read_to_string(&log).unwrap();
    let first = first.lines().next().expect("gpuscale logged decisions");
    let d: Value = serde_json::from_str(first).unwrap();
    assert!(d.get("desired").is_some() && d.get("winner").is_some());
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_trace(dir.path());
    let mut texts = Vec::new();
    for name in ["a.csv", "b.csv"] {
        let out = dir.path().join(name);
        run(args(&[
            "--trace",
            trace.to_str().unwrap(),
            "--policy",
            "gpuscale,knative-kpa",
            "--report",
            "csv",
            "--out",
            out.to_str().unwrap(),
        ]))
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        // Drop the wall-clock columns (wall_s, sim_requests_per_s) if present.
        let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let keep: Vec<usize> = (0..header.len())
            .filter(|&i| !matches!(header[i], "wall_s" | "sim_requests_per_s"))
            .collect();
        let stable: Vec<String> = text
            .lines()
            .map(|l| {
                let cells: Vec<&str> = l.split(',').collect();
                keep.iter()
                    .filter_map(|&i| cells.get(i).copied())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        texts.push(stable);
    }
    assert_eq!(texts[0], texts[1]);
}

#[test]
fn bad_flags_are_usage_errors_naming_the_flag_and_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_trace(dir.path());
    let t = trace.to_str().unwrap();
    for (flags, flag) in [
        (vec!["--trace", t, "--report", "xml"], "--report"),
        (vec!["--trace", t, "--policy", "hpa-on-vibes"], "--policy"),
        (vec!["--trace", t, "--itl-slo", "fast"], "--itl-slo"),
        (vec!["--trace", t, "--rate-scale=-2"], "--rate-scale"),
        (vec!["--trace", t, "--profile", "no-such-gpu"], "--profile"),
        (vec!["--trace", t, "--jobs", "0"], "--jobs"),
        (vec!["--trace", t, "--arrivals", "uniform"], "--arrivals"),
        (
            vec!["--trace", t, "--slo-percentile", "100"],
            "--slo-percentile",
        ),
        (
            vec!["--matrix", "--slo-percentile", "0"],
            "--slo-percentile",
        ),
        (
            vec!["--suite", "--slo-percentile", "NaN"],
            "--slo-percentile",
        ),
    ] {
        let e = run(args(&flags)).expect_err(flag);
        assert!(e.is_usage(), "{flag}: {e}");
        assert!(e.to_string().contains(flag), "{flag}: {e}");
    }
    let missing = dir.path().join("missing.jsonl");
    let e = run(args(&["--trace", missing.to_str().unwrap()])).expect_err("missing file");
    assert!(e.to_string().contains("missing.jsonl"), "{e}");
}

/// Ten minutes with a load step and short bursts, prompts of every length
/// (a few too long for the TTFT objective).
fn write_bursty_trace(dir: &Path) -> std::path::PathBuf {
    let mut rng = gpuscale_sim::rng::SimRng::new(17, 0);
    let mut text = String::new();
    let mut t = 0.0f64;
    while t < 600.0 {
        let rate = match t {
            t if (240.0..420.0).contains(&t) => 40.0,
            t if (t % 97.0) < 4.0 => 80.0,
            _ => 12.0,
        };
        t += rng.exponential(1.0 / rate);
        let long = rng.below(50) == 0;
        let input = if long {
            20_000 + rng.below(60_000)
        } else {
            100 + rng.below(3_000)
        };
        text.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {input}, \"output_length\": {}}}\n",
            (t * 1000.0).round() as u64,
            2 + rng.below(300)
        ));
    }
    let path = dir.join("bursty.jsonl");
    std::fs::write(&path, text).expect("the temporary directory is writable");
    path
}

#[test]
fn no_policy_or_baseline_setting_reaches_a_lower_bound_point_with_fewer_gpu_hours() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write_bursty_trace(dir.path());
    let out = dir.path().join("all.json");
    run(args(&[
        "--trace",
        trace.to_str().unwrap(),
        "--policy",
        "all",
        "--sweep",
        "--cold-start",
        "60s",
        "--report",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]))
    .expect("the run succeeds");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = report.as_array().expect("a list");
    let bound: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r["policy"] == "lower-bound")
        .map(|r| {
            (
                r["slo_attainment"].as_f64().unwrap(),
                r["gpu_hours"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(bound.len() >= 5, "the bound's frontier: {bound:?}");
    let ceiling = rows[0]["attainable_ceiling"].as_f64().unwrap();
    assert!(
        ceiling < 1.0,
        "some prompts are too long for the TTFT objective"
    );
    let others: Vec<&Value> = rows
        .iter()
        .filter(|r| r["policy"] != "lower-bound")
        .collect();
    assert!(
        others.len() > 60,
        "every baseline over its sweep: {}",
        others.len()
    );
    for r in others {
        let (a, g) = (
            r["slo_attainment"].as_f64().unwrap(),
            r["gpu_hours"].as_f64().unwrap(),
        );
        assert!(a <= ceiling + 1e-12, "{} above the ceiling", r["policy"]);
        for (ba, bg) in &bound {
            assert!(
                !(a >= *ba && g < *bg * (1.0 - 1e-9)),
                "{} [{}] reaches {a} with {g} GPU-h; the bound's point ({ba}, {bg}) is beaten",
                r["policy"],
                r["target"]
            );
        }
        assert_eq!(r["beats_lower_bound"], false);
    }
}
