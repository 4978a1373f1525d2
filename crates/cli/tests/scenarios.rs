//! Golden planner scenarios (in the manner of Pacemaker's cts/scheduler).
//!
//! Each folder under `tests/scenarios/` holds `cluster.toml`, optionally
//! `state.toml` (observed state, see the user guide), and `expected.txt`: what
//! `understudy check` and `understudy plan --state state.toml` print.
//! Run with `UPDATE_SCENARIOS=1` to rewrite the expected files, then review
//! the diff with `git diff tests/scenarios`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write;
use std::path::{Path, PathBuf};

use understudy_config::Source;
use understudy_core::{Observed, Time};

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios")
}

/// What the CLI would print for one scenario.
fn run(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("cluster.toml")).expect("cluster.toml");
    let checked = understudy_config::check(&text);
    let mut out = String::from("# understudy check cluster.toml\n");
    out.push_str(&Source::new("cluster.toml", &text).render_all(&checked.diagnostics));
    let Some(spec) = checked.spec else {
        return out;
    };
    let state_path = dir.join("state.toml");
    let (observed, now) = if state_path.exists() {
        let state = std::fs::read_to_string(&state_path).expect("state.toml");
        match understudy_config::parse_state(&state, &spec) {
            Ok(v) => v,
            Err(diags) => {
                out.push_str("# state.toml\n");
                out.push_str(&Source::new("state.toml", &state).render_all(&diags));
                return out;
            }
        }
    } else {
        (Observed::all_up(&spec), Time::ZERO)
    };
    let _ = writeln!(
        out,
        "# understudy plan cluster.toml{}",
        if state_path.exists() { " --state state.toml" } else { "" }
    );
    let plan = understudy_core::plan(&spec, &observed, now);
    out.push_str(&understudy_core::render::plan_text(&plan));
    // Determinism: planning again gives the same bytes.
    let again = understudy_core::render::plan_text(&understudy_core::plan(&spec, &observed, now));
    assert_eq!(
        again,
        understudy_core::render::plan_text(&plan),
        "{}: plan is not deterministic",
        dir.display()
    );
    out
}

#[test]
fn golden_scenarios() {
    let update = std::env::var_os("UPDATE_SCENARIOS").is_some();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .expect("tests/scenarios exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.join("cluster.toml").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 30, "expected at least 30 scenarios, found {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let actual = run(dir);
        let expected_path = dir.join("expected.txt");
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if actual == expected {
            continue;
        }
        if update {
            std::fs::write(&expected_path, &actual).expect("write expected.txt");
            eprintln!("updated {}", expected_path.display());
        } else {
            failures.push(format!(
                "--- {} (expected)\n{expected}\n+++ (actual)\n{actual}",
                expected_path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} scenario(s) differ; rerun with UPDATE_SCENARIOS=1 and review `git diff tests/scenarios`\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
