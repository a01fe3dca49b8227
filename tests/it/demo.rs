//! `sync-daemon demo` runs the whole pipeline against its own simulators, exits 0 and reports
//! that the second pass (nothing changed) wrote nothing to RevKeen.

use crate::support::{command, exit, run_command};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_reports_zero_writes_on_the_second_pass() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut demo = command(dir.path());
    demo.args(["demo", "--clients", "400", "--patients", "150"]);
    let out = run_command(demo).await;
    out.assert_exit(exit::OK);

    let (first, second) = out
        .stdout
        .split_once("Second pass")
        .unwrap_or_else(|| panic!("no second pass in the report\n{}", out.transcript()));
    let writes = |section: &str| -> u64 {
        let line = section
            .lines()
            .find_map(|line| line.trim().strip_prefix("RevKeen: "))
            .unwrap_or_else(|| panic!("no RevKeen line\n{}", out.transcript()));
        line.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable RevKeen line {line:?}"))
    };
    assert!(writes(first) > 0, "{}", out.transcript());
    assert_eq!(writes(second), 0, "{}", out.transcript());
}
