//! `sync-daemon completions SHELL` and `sync-daemon man` are generated from the CLI the binary
//! parses: bash completes the commands and their flags from the script, an unknown shell is a
//! usage error, and the manual pages are roff naming every command (the Debian package ships
//! them; `.ci/package` also renders them with groff).

use std::path::Path;

use crate::support::{Output, exit, run_command};

/// The commands an operator types (the hidden `man` aside).
const COMMANDS: [&str; 8] = [
    "status",
    "failures",
    "replay",
    "check-config",
    "healthcheck",
    "demo",
    "sim",
    "completions",
];

async fn run(args: &[&str]) -> Output {
    let mut command = crate::support::command(Path::new("."));
    command.args(args);
    run_command(command).await
}

/// What bash offers after `words` (the last one the word being completed), with the script
/// sourced as a user's shell would.
async fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let bash = crate::support::require_tool("bash", "bash");
    let mut command = tokio::process::Command::new(bash);
    command
        .args(["--norc", "--noprofile", "-c"])
        .arg(
            r#"source "$1"; shift
            function=$(complete -p sync-daemon | sed -E 's/.*-F ([^ ]+) .*/\1/')
            COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
            "$function" sync-daemon "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            printf '%s\n' "${COMPREPLY[@]}""#,
        )
        .arg("bash")
        .arg(script)
        .args(words);
    let out = run_command(command).await;
    out.assert_exit(exit::OK);
    out.stdout.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_completes_the_commands_and_their_flags() {
    let out = run(&["completions", "bash"]).await;
    out.assert_exit(exit::OK);
    for word in COMMANDS.iter().chain(&[
        "--config",
        "--once",
        "--dry-run",
        "--resync",
        "--source",
        "--json",
    ]) {
        assert!(
            out.stdout.contains(word),
            "the bash script never mentions {word}"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("sync-daemon.bash");
    std::fs::write(&script, &out.stdout).expect("write the script");

    let commands = bash_completes(&script, &["sync-daemon", ""]).await;
    for command in COMMANDS {
        assert!(
            commands.iter().any(|c| c == command),
            "`sync-daemon <TAB>` does not offer {command}: {commands:?}"
        );
    }
    assert_eq!(
        bash_completes(&script, &["sync-daemon", "che"]).await,
        ["check-config"]
    );
    assert_eq!(
        bash_completes(&script, &["sync-daemon", "--dr"]).await,
        ["--dry-run"]
    );
    // After a command: its own flags, and the shells `completions` takes.
    let status = bash_completes(&script, &["sync-daemon", "status", "--"]).await;
    assert!(
        status.iter().any(|f| f == "--json"),
        "`sync-daemon status --<TAB>` does not offer --json: {status:?}"
    );
    let shells = bash_completes(&script, &["sync-daemon", "completions", ""]).await;
    for shell in ["bash", "zsh", "fish"] {
        assert!(
            shells.iter().any(|s| s == shell),
            "`sync-daemon completions <TAB>` does not offer {shell}: {shells:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_gets_a_script_and_an_unknown_shell_is_a_usage_error() {
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]).await;
        out.assert_exit(exit::OK);
        for command in COMMANDS {
            assert!(
                out.stdout.contains(command),
                "the {shell} script never mentions {command}"
            );
        }
    }
    let out = run(&["completions", "tcsh"]).await;
    out.assert_exit(exit::USAGE);
    assert!(
        out.stderr.contains("tcsh") && out.stderr.contains("bash"),
        "the refusal names the shell and the ones there are:\n{}",
        out.transcript()
    );
    assert!(out.stdout.is_empty(), "{}", out.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_pages_name_every_command() {
    let out = run(&["man"]).await;
    out.assert_exit(exit::OK);
    let page = &out.stdout;
    assert!(
        page.lines()
            .any(|line| line.starts_with(".TH sync-daemon 1 ")),
        "no .TH title for sync-daemon(1):\n{page}"
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
        assert!(page.contains(section), "no {section}:\n{page}");
    }
    for command in COMMANDS {
        let reference = format!("sync\\-daemon\\-{}(1)", command.replace('-', "\\-"));
        assert!(
            page.contains(&reference),
            "sync-daemon(1) does not name {reference}"
        );
    }
    assert!(
        !page.contains("daemon\\-help(1)") && !page.contains("daemon\\-man(1)"),
        "a page is named that is not written"
    );

    // The pages it names exist: `--out-dir` writes one per command.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&["man", "--out-dir", dir.path().to_str().expect("utf-8")]).await;
    out.assert_exit(exit::OK);
    for command in COMMANDS {
        let name = format!("sync-daemon-{command}");
        let text = std::fs::read_to_string(dir.path().join(format!("{name}.1")))
            .unwrap_or_else(|e| panic!("{name}.1: {e}"));
        assert!(
            text.contains(&format!(".TH {name} 1 ")),
            "{name}.1 has no title:\n{text}"
        );
    }
    let main = std::fs::read_to_string(dir.path().join("sync-daemon.1")).expect("sync-daemon.1");
    assert_eq!(&main, page, "the page on stdout is the one written");
}
