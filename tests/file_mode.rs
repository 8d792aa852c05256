//! Golden end-to-end tests of `sessionizer run` in file mode, run as the real
//! binary: the turns and dead letters must equal the files under
//! `tests/golden/<case>/`, and everything written must validate against the
//! JSON Schemas in `schemas/`.
//!
//! To accept a deliberate change of output, run with `UPDATE_GOLDEN=1` and
//! review the diff of `tests/golden/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessionizer"));
    // Overrides from the caller's environment must not leak into a test.
    for (name, _) in std::env::vars() {
        if name.starts_with("SESSIONIZER") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `run` with `examples/file.toml` on these files.
fn run_example(input: &Path, output: &Path, dlq: &Path) -> Output {
    bin()
        .args(["run", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/file.toml"))
        .env("SESSIONIZER__FILE__INPUT", input)
        .env("SESSIONIZER__FILE__OUTPUT", output)
        .env("SESSIONIZER__FILE__DLQ", dlq)
        .output()
        .unwrap()
}

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

fn assert_valid(validator: &jsonschema::Validator, what: &str, value: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not validate: {errors:?}\n{value}"
    );
}

/// Runs a golden case; returns (turns, dead letters) as parsed JSON lines.
fn run_case(case: &str) -> (Vec<Value>, Vec<Value>) {
    let dir = golden_dir(case);
    let tmp = tempfile::tempdir().unwrap();
    let (turns_path, dlq_path) = (tmp.path().join("turns.jsonl"), tmp.path().join("dlq.jsonl"));
    let out = bin()
        .args(["run", "--config"])
        .arg(dir.join("config.toml"))
        .env("SESSIONIZER__FILE__INPUT", dir.join("input.jsonl"))
        .env("SESSIONIZER__FILE__OUTPUT", &turns_path)
        .env("SESSIONIZER__FILE__DLQ", &dlq_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (read_lines(&turns_path), read_lines(&dlq_path))
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Drops what differs from run to run (time of failure, worker, temp paths).
fn normalize_dead_letter(mut letter: Value) -> Value {
    let obj = letter.as_object_mut().unwrap();
    assert!(obj.remove("failed_at").is_some(), "failed_at present");
    assert!(obj.remove("worker").is_some(), "worker present");
    let name = obj["source"]["name"].as_str().unwrap();
    let base = Path::new(name)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    obj["source"]["name"] = Value::String(base);
    letter
}

fn check_golden(case: &str, file: &str, got: &[Value]) {
    let path = golden_dir(case).join(file);
    let text: String = got.iter().map(|v| format!("{v}\n")).collect();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    let want: Vec<Value> = want
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, &want[..], "{case}/{file} differs from the golden file");
}

fn golden(case: &str) -> (Vec<Value>, Vec<Value>) {
    let (turns, dlq) = run_case(case);
    let (turn_schema, dlq_schema) = (
        schema("turn.schema.json"),
        schema("dead_letter.schema.json"),
    );
    for t in &turns {
        assert_valid(&turn_schema, "a turn", t);
    }
    for d in &dlq {
        assert_valid(&dlq_schema, "a dead letter", d);
    }
    let dlq: Vec<Value> = dlq.into_iter().map(normalize_dead_letter).collect();
    check_golden(case, "turns.jsonl", &turns);
    check_golden(case, "dlq.jsonl", &dlq);
    (turns, dlq)
}

#[test]
fn golden_conversation() {
    let (turns, dlq) = golden("conversation");
    assert!(dlq.is_empty());
    let summary: Vec<(&str, &str, bool)> = turns
        .iter()
        .map(|t| {
            (
                t["user_id"].as_str().unwrap(),
                t["closed_by"].as_str().unwrap(),
                t["late"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("alice", "gap", false),
            // An end of turn's turn waits for the watermark to pass it.
            ("alice", "gap", true),
            ("carol", "end_of_turn", false),
            ("bob", "gap", false),
            ("dave", "gap", false)
        ]
    );
    assert_eq!(
        turns[0]["text"], "hi\nquick question\nmy order #123 never arrived",
        "duplicate a2 dropped"
    );
    assert_eq!(
        turns[3]["text"], "arrived out of order\nhello\nare you there?",
        "event-time order, typing bridged the gap"
    );
    assert_eq!(turns[3]["conversation_id"], "support");
}

#[test]
fn golden_every_poison_kind() {
    let (turns, dlq) = golden("poison");
    let reasons: Vec<(&str, u64)> = dlq
        .iter()
        .map(|d| {
            (
                d["reason"].as_str().unwrap(),
                d["source"]["position"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("decode", 1),
            ("invalid", 2),
            ("invalid", 3),
            ("invalid", 4),
            ("invalid", 5),
            ("oversize", 6),
            ("oversize", 7),
            ("decode", 8),
            ("invalid", 9),
            ("invalid", 10),
            ("late", 13)
        ]
    );
    // The original line, byte for byte (its first bytes when it was over
    // max_record_bytes).
    let input = std::fs::read(golden_dir("poison").join("input.jsonl")).unwrap();
    let lines: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
    for d in &dlq {
        let line = lines[d["source"]["position"].as_u64().unwrap() as usize - 1];
        let original = match (d.get("payload"), d.get("payload_base64")) {
            (Some(p), None) => p.as_str().unwrap().as_bytes().to_vec(),
            (None, Some(b)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b.as_str().unwrap())
                    .unwrap()
            }
            other => panic!("exactly one payload form expected: {other:?}"),
        };
        match d.get("truncated") {
            None => assert_eq!(original, line),
            Some(t) => {
                assert_eq!(t["original_bytes"], line.len());
                assert_eq!(original, line[..original.len()]);
                assert!(original.len() < line.len());
            }
        }
    }
    assert_eq!(turns.len(), 2, "ok1 and x1 become turns");
}

/// The order-independent rules (`docs/semantics.md`, "Sessions and turns"):
/// an end of turn that overtook the burst's last message still ends after
/// it, a voice note's own `gap_ms` bridges to its transcript, a huge
/// `gap_ms` is clamped to `max_gap`, and `follow_up` links a turn to the
/// key's previous one.
#[test]
fn golden_order() {
    let (turns, dlq) = golden("order");
    assert!(dlq.is_empty());
    let of =
        |user: &str| -> Vec<&Value> { turns.iter().filter(|t| t["user_id"] == user).collect() };
    let ids = |t: &Value| -> Vec<String> {
        t["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let ann = of("ann");
    assert_eq!(ids(ann[0]), ["a1", "a2"], "one answer for the burst");
    assert_eq!(ann[0]["closed_by"], "end_of_turn");
    assert_eq!(ids(ann[1]), ["a3"]);
    assert_eq!(ann[1]["previous_turn_id"], ann[0]["turn_id"]);
    assert!(ann[0].get("previous_turn_id").is_none());
    assert_eq!(
        ids(of("vic")[0]),
        ["v1", "v2"],
        "bridged by the note's own gap"
    );
    assert_eq!(
        ids(of("xen")[0]),
        ["x1", "x2"],
        "gap clamped to max_gap, 20 s"
    );
    let tim = of("tim");
    assert_eq!(
        (ids(tim[0]), ids(tim[1])),
        (vec!["t1".to_owned()], vec!["t2".to_owned()])
    );
    assert_eq!(tim[1]["previous_turn_id"], tim[0]["turn_id"]);
    assert!(of("zed")[0].get("previous_turn_id").is_none());
}

#[test]
fn golden_caps() {
    let (turns, _) = golden("caps");
    let closed: Vec<(&str, &str, u64)> = turns
        .iter()
        .map(|t| {
            (
                t["user_id"].as_str().unwrap(),
                t["closed_by"].as_str().unwrap(),
                t["message_count"].as_u64().unwrap(),
            )
        })
        .collect();
    for want in [
        ("chatty", "max_messages", 3),
        ("wordy", "max_bytes", 2),
        ("slow", "max_duration", 2),
    ] {
        assert!(closed.contains(&want), "{want:?} in {closed:?}");
    }
}

/// The values the redaction cases hide.
const SENSITIVE: [&str; 9] = [
    "alice@example.com",
    "4111 1111 1111 1111",
    "#4242",
    "+49 30 1234567",
    "DE89 3704 0044 0532 0130 00",
    "192.168.10.1",
    "admin:s3cret",
    "123-45-6789",
    "s3cret",
];

/// No sensitive value in any turn, the joined text is the join of the
/// redacted messages, and the dead letter keeps the original bytes.
fn assert_redacted(turns: &[Value], dlq: &[Value]) {
    let output = serde_json::to_string(turns).unwrap();
    for value in SENSITIVE {
        assert!(
            !output.contains(value),
            "{value} reached the output: {output}"
        );
    }
    for t in turns {
        let joined: Vec<&str> = t["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(t["text"], joined.join("\n"));
        assert!(
            t["redactions"].is_array(),
            "every turn says what was found: {t}"
        );
    }
    assert!(
        output.contains("4111 1111 1111 1112"),
        "a Luhn failure is kept"
    );
    assert_eq!(dlq.len(), 1);
    assert!(dlq[0]["payload"]
        .as_str()
        .unwrap()
        .contains("alice@example.com"));
}

#[test]
fn golden_redact_mask() {
    let (turns, dlq) = golden("redact_mask");
    assert_redacted(&turns, &dlq);
    assert_eq!(
        turns[0]["text"],
        "hi, my email is [EMAIL]\ncard [CREDIT_CARD], order [ORDER_ID]"
    );
    assert_eq!(turns[0]["messages"][1]["attributes"]["email"], "[EMAIL]");
    assert_eq!(turns[0]["messages"][1]["attributes"]["lang"], "en");
}

/// Tokens in the turns; `reidentify` with the same configuration gives back
/// every original text exactly.
#[test]
fn golden_redact_tokenize_and_reidentify() {
    let (turns, dlq) = golden("redact_tokenize");
    assert_redacted(&turns, &dlq);
    let first = turns[0]["messages"][0]["text"].as_str().unwrap();
    assert!(first.starts_with("hi, my email is [EMAIL:"), "{first}");
    let dir = golden_dir("redact_tokenize");
    let mut child = bin()
        .args(["reidentify", "--config"])
        .arg(dir.join("config.toml"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let texts: Vec<String> = turns
        .iter()
        .flat_map(|t| t["messages"].as_array().unwrap().clone())
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(texts.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let originals: Vec<String> = std::fs::read_to_string(dir.join("input.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["user_id"] != "")
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    let mut restored: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    let mut want: Vec<&str> = originals.iter().map(String::as_str).collect();
    restored.sort();
    want.sort();
    assert_eq!(restored, want);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens restored, 0 left"), "{stderr}");
}

/// `dlq inspect` shows dead letters through the `[redact]` detectors by
/// default; `--no-redact` shows the original bytes the dead letter keeps.
#[test]
fn dlq_inspect_redacts_payloads_when_redact_is_configured() {
    let dir = golden_dir("redact_mask");
    let tmp = tempfile::tempdir().unwrap();
    let dlq = tmp.path().join("dlq.jsonl");
    let with_paths = |cmd: &mut Command| {
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("SESSIONIZER__FILE__INPUT", dir.join("input.jsonl"))
            .env("SESSIONIZER__FILE__OUTPUT", tmp.path().join("turns.jsonl"))
            .env("SESSIONIZER__FILE__DLQ", &dlq);
    };
    let mut run = bin();
    run.arg("run");
    with_paths(&mut run);
    assert!(run.output().unwrap().status.success());
    let inspect = |extra: &[&str]| -> Value {
        let mut cmd = bin();
        cmd.args(["dlq", "inspect", "--json"]).args(extra);
        with_paths(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let shown = inspect(&[]);
    let payload = shown["payload"].as_str().unwrap();
    assert!(
        payload.contains("[EMAIL]") && !payload.contains("alice@example.com"),
        "{payload}"
    );
    let raw = inspect(&["--no-redact"]);
    assert!(raw["payload"]
        .as_str()
        .unwrap()
        .contains("alice@example.com"));
}

/// A missing or short key fails at start naming the key; the key itself
/// appears nowhere: not in errors, `check-config`, logs or output.
#[test]
fn the_tokenization_key_is_checked_at_start_and_never_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(
        &config,
        "source = \"file\"\n[file]\ndlq = \"-\"\n[redact]\nmode = \"tokenize\"\nkey_env = \"TEST_REDACT_KEY\"\n",
    )
    .unwrap();
    let run = |command: &str, key: Option<&str>| {
        let mut cmd = bin();
        cmd.args([command, "--config"])
            .arg(&config)
            .env_remove("TEST_REDACT_KEY");
        if let Some(key) = key {
            cmd.env("TEST_REDACT_KEY", key);
        }
        cmd.env(
            "SESSIONIZER__FILE__INPUT",
            golden_dir("redact_mask").join("input.jsonl"),
        )
        .output()
        .unwrap()
    };
    let missing = run("run", None);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("redact.key_env") && stderr.contains("TEST_REDACT_KEY is not set"),
        "{stderr}"
    );

    let short = "c2hvcnQga2V5IG9mIHRoaXJ0eS10d28gYnl0ZXMhISE=";
    for command in ["run", "check-config"] {
        let refused = run(command, Some(short));
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("redact.key_env") && stderr.contains("32 bytes"),
            "{stderr}"
        );
        assert!(!stderr.contains(short), "the key in an error: {stderr}");
    }

    let key = std::fs::read_to_string(golden_dir("redact_tokenize").join("test.key")).unwrap();
    let key = key.trim();
    for command in ["run", "check-config"] {
        let ok = run(command, Some(key));
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let all = [ok.stdout, ok.stderr].concat();
        let text = String::from_utf8_lossy(&all);
        assert!(
            !text.contains(key) && !text.contains(&key[..16]),
            "the key shown by {command}"
        );
    }
}

#[test]
fn golden_inputs_are_valid_chat_events() {
    let validator = schema("chat_event.schema.json");
    for case in ["conversation", "caps"] {
        for line in std::fs::read_to_string(golden_dir(case).join("input.jsonl"))
            .unwrap()
            .lines()
        {
            if !line.trim().is_empty() {
                assert_valid(
                    &validator,
                    "a golden input event",
                    &serde_json::from_str(line).unwrap(),
                );
            }
        }
    }
    // And the schema rejects what the decoder rejects for being invalid.
    let bad = serde_json::json!({"message_id": "m", "user_id": "u", "event_time": 5});
    assert!(!validator.is_valid(&bad), "a message without text");
}

#[test]
fn stdin_to_stdout_and_protobuf_output() {
    let dir = golden_dir("conversation");
    let input = std::fs::read(dir.join("input.jsonl")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "source = \"file\"\n[file]\ninput = \"-\"\noutput = \"-\"\ndlq = {:?}\n",
            tmp.path().join("dlq").display()
        ),
    )
    .unwrap();

    let run = |format: &str| -> Output {
        let mut child = bin()
            .args(["run", "--config"])
            .arg(&config)
            .env("SESSIONIZER__OUTPUT__FORMAT", format)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    };
    let json = run("json");
    assert!(json.status.success());
    let want: Vec<Value> = read_lines(&dir.join("turns.jsonl"));
    let got: Vec<Value> = String::from_utf8(json.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, want);

    // Protobuf: length-delimited Turn messages, the same turns.
    let pb = run("protobuf");
    assert!(pb.status.success());
    let mut buf = &pb.stdout[..];
    let mut ids = Vec::new();
    while !buf.is_empty() {
        use prost::Message;
        let turn = sessionizer::codec::proto::Turn::decode_length_delimited(&mut buf).unwrap();
        ids.push(turn.turn_id);
    }
    let want_ids: Vec<&str> = want
        .iter()
        .map(|t| t["turn_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, want_ids);
}

/// Events far behind the watermark (a backlog written behind live traffic)
/// are late; the worker says so in a warning with their count.
#[test]
fn late_events_are_logged_as_a_warning_with_the_count() {
    let tmp = tempfile::tempdir().unwrap();
    let event = |id: &str, user: &str, t: i64| {
        format!(r#"{{"message_id":"{id}","user_id":"{user}","text":"x","event_time":{t}}}"#)
    };
    let t = 1_700_000_000_000i64;
    let lines = [
        event("m1", "live", t + 3_600_000),
        event("m2", "backlog", t),
        event("m3", "backlog", t + 10_000),
    ];
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (output, dlq) = (tmp.path().join("out"), tmp.path().join("dlq"));
    let run = run_example(&input, &output, &dlq);
    assert!(run.status.success());
    let turns = read_lines(&output);
    assert_eq!(turns.iter().filter(|t| t["late"] == true).count(), 2);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("late events"))
        .unwrap_or_else(|| panic!("no late-events warning: {stderr}"));
    assert!(warning.contains("count=1"), "{warning}");
    // The watermark is the newest time less max_out_of_orderness (500 ms).
    assert!(warning.contains("behind_s=3599"), "{warning}");
}

#[test]
fn bad_config_fails_before_reading_with_the_key_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    let output = tmp.path().join("turns.jsonl");
    std::fs::write(
        &config,
        format!("source = \"file\"\n[window]\ngap = \"soon\"\n[file]\ninput = \"-\"\noutput = {:?}\ndlq = \"d\"\n", output.display()),
    )
    .unwrap();
    let out = bin()
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("window.gap") && stderr.contains("invalid duration"),
        "{stderr}"
    );
    assert!(!output.exists(), "nothing was opened or written");

    let out = bin()
        .args(["check-config", "--config"])
        .arg(&config)
        .env("SESSIONIZER__WINDOW__GAP", "4s")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective = String::from_utf8(out.stdout).unwrap();
    assert!(
        effective.contains("gap = \"4s\"") && effective.contains("max_messages = 200"),
        "{effective}"
    );

    // check-config checks the files as run opens them.
    let missing_input = tmp.path().join("missing-input.toml");
    std::fs::write(
        &missing_input,
        format!(
            "source = \"file\"\n[file]\ninput = {:?}\noutput = \"-\"\ndlq = \"-\"\n",
            tmp.path().join("no-such-events.jsonl")
        ),
    )
    .unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&missing_input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("file.input") && stderr.contains("no-such-events.jsonl"),
        "{stderr}"
    );

    let missing = bin()
        .args(["run", "--config"])
        .arg(tmp.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.toml"));
}

/// `dlq stats`, `inspect` and `replay` on a file-mode dead-letter file: the
/// counts match what was written, `--json` parses, and the replayed records
/// (after a configuration fix) become turns in the next file-mode run.
#[test]
fn dlq_commands_on_a_dead_letter_file() {
    let dir = golden_dir("poison");
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join("config.toml");
    let dlq_path = tmp.path().join("dlq.jsonl");
    let base = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let write_config = |text: &str, input: &Path, output: &Path| {
        let text = text.replace(
            "dlq = \"dlq.jsonl\"",
            &format!(
                "input = {:?}\noutput = {:?}\ndlq = {:?}",
                input.to_str().unwrap(),
                output.to_str().unwrap(),
                dlq_path.to_str().unwrap()
            ),
        );
        std::fs::write(&config_path, text).unwrap();
    };
    let run = |args: &[&str]| -> String {
        let out = bin()
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    write_config(
        &base,
        &dir.join("input.jsonl"),
        &tmp.path().join("turns.jsonl"),
    );
    run(&["run"]);
    let written = read_lines(&dlq_path);

    let stats: Value = serde_json::from_str(&run(&["dlq", "stats", "--json"])).unwrap();
    assert_eq!(stats["total"], written.len());
    for reason in ["decode", "invalid", "oversize", "late"] {
        let want = written.iter().filter(|d| d["reason"] == reason).count();
        assert_eq!(stats["by_reason"][reason], want, "{reason}");
    }
    let oversize: Vec<Value> = run(&[
        "dlq",
        "inspect",
        "--json",
        "--reason",
        "oversize",
        "--oldest-first",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(oversize.len(), 2);
    for (entry, original) in oversize
        .iter()
        .zip(written.iter().filter(|d| d["reason"] == "oversize"))
    {
        assert_eq!(entry["payload"], original["payload"]);
        assert_eq!(
            entry["source"]["position"],
            original["source"]["position"].to_string()
        );
    }
    let table = run(&["dlq", "inspect", "--limit", "1"]);
    assert!(
        table.starts_with("POSITION") && table.lines().count() == 2,
        "{table}"
    );
    // An empty selection says so (on stderr; stdout keeps only the header).
    let none = bin()
        .args(["dlq", "inspect", "--reason", "max_deliveries", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("no dead letters match"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );

    // The fix: longer texts allowed; the replay is the next run's input.
    // The record over max_record_bytes (p6) was kept only in part: it is
    // skipped, never sent as a prefix.
    let replayed = tmp.path().join("replayed.jsonl");
    let report = run(&[
        "dlq",
        "replay",
        "--reason",
        "oversize",
        "--to",
        replayed.to_str().unwrap(),
    ]);
    assert!(
        report.contains("keeps only the first 512 of the record's 684 bytes"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(&replayed).unwrap().lines().count(),
        1
    );
    let fixed = base
        .replace("max_record_bytes = 512", "max_record_bytes = 65536")
        .replace("max_text_bytes = 64", "max_text_bytes = 1024");
    let turns_path = tmp.path().join("replayed-turns.jsonl");
    write_config(&fixed, &replayed, &turns_path);
    run(&["run"]);
    let ids: Vec<String> = read_lines(&turns_path)
        .iter()
        .flat_map(|t| t["messages"].as_array().unwrap().clone())
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["p5"], "the replayed record became a turn");
}

/// `sessionizer produce` at a rate stamps events with the wall clock (minus
/// their modeled arrival delay, so the disorder stays below `--disorder`);
/// protobuf cannot go into a file of JSON lines and is refused with the
/// reason.
#[test]
fn produce_at_a_rate_stamps_wall_clock_times_and_refuses_protobuf_for_files() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.toml");
    let events = tmp.path().join("events.jsonl");
    std::fs::write(&config, "source = \"file\"\n[file]\ndlq = \"dlq.jsonl\"\n").unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let before = now();
    let out = bin()
        .args([
            "produce", "--rate", "2000", "--count", "300", "--users", "50",
        ])
        .args(["--disorder", "300ms", "--to"])
        .arg(&events)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = now();
    let times: Vec<i64> = read_lines(&events)
        .iter()
        .map(|e| e["event_time"].as_i64().unwrap())
        .collect();
    assert_eq!(times.len(), 300);
    let mut max_seen = i64::MIN;
    for t in &times {
        assert!(
            (before - 300..=after).contains(t),
            "event time {t} near the run"
        );
        assert!(
            max_seen.saturating_sub(*t) < 300,
            "disorder below --disorder"
        );
        max_seen = max_seen.max(*t);
    }

    // Without --rate, a file gets the events as fast as possible, with the
    // modeled event times (starting a day ago) instead of paced ones.
    let out = bin()
        .args(["produce", "--count", "300", "--to"])
        .arg(&events)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let first = read_lines(&events)[0]["event_time"].as_i64().unwrap();
    assert!(
        first < before - 12 * 3_600_000,
        "unpaced: event time {first} a day back"
    );

    let out = bin()
        .args([
            "produce", "--count", "1", "--format", "protobuf", "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--format protobuf") && stderr.contains("JSON lines"),
        "{stderr}"
    );
}

/// Output and dead-letter paths that name the input (or each other) through
/// `.`, a symlink or a hard link are refused at start, and nothing is
/// truncated: paths were compared as strings, so `/x/./in.jsonl` wiped the
/// input.
#[test]
fn aliased_paths_are_refused_and_nothing_is_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let input = dir.join("in.jsonl");
    let line =
        "{\"message_id\":\"m1\",\"user_id\":\"u\",\"text\":\"hi\",\"event_time\":1700000000000}\n";
    std::fs::write(&input, line).unwrap();
    std::os::unix::fs::symlink(&input, dir.join("link.jsonl")).unwrap();
    std::fs::hard_link(&input, dir.join("hard.jsonl")).unwrap();
    let keep = dir.join("keep.jsonl");
    std::fs::write(&keep, "a dead letter kept from before\n").unwrap();
    std::os::unix::fs::symlink(&keep, dir.join("keep-link.jsonl")).unwrap();
    let d = dir.display();
    for (output, dlq, key) in [
        (
            format!("{d}/./in.jsonl"),
            format!("{d}/d.jsonl"),
            "file.output",
        ),
        (
            format!("{d}/link.jsonl"),
            format!("{d}/d.jsonl"),
            "file.output",
        ),
        (
            format!("{d}/t.jsonl"),
            format!("{d}/hard.jsonl"),
            "file.dlq",
        ),
        (
            format!("{d}/keep.jsonl"),
            format!("{d}/x/../keep-link.jsonl"),
            "file.dlq",
        ),
    ] {
        std::fs::create_dir_all(dir.join("x")).unwrap();
        let out = run_example(&input, output.as_ref(), dlq.as_ref());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{output} {dlq}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("same file"),
            "{output} {dlq}: {stderr}"
        );
        assert_eq!(std::fs::read_to_string(&input).unwrap(), line, "input kept");
    }
    assert_eq!(
        std::fs::read_to_string(&keep).unwrap(),
        "a dead letter kept from before\n",
        "the output opened first was not truncated either: it was checked before"
    );
}

/// A line over `input.max_record_bytes` is dead-lettered with its first
/// 64 KiB, its length and its SHA-256, and the next line is read as usual:
/// a 200 MB line used to be buffered whole and copied whole into the DLQ.
#[test]
fn a_line_over_the_size_bound_is_dead_lettered_truncated() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let huge = vec![1u8; 5 << 20];
    let mut bytes = huge.clone();
    bytes.extend_from_slice(
        b"\n{\"message_id\":\"m1\",\"user_id\":\"u\",\"text\":\"hi\",\"event_time\":1700000000000}\n",
    );
    std::fs::write(&input, &bytes).unwrap();
    let (turns_path, dlq_path) = (tmp.path().join("t.jsonl"), tmp.path().join("d.jsonl"));
    let out = run_example(&input, &turns_path, &dlq_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let turns = read_lines(&turns_path);
    assert_eq!(turns.len(), 1, "the line after it is read as usual");
    assert!(
        // 64 KiB of \x01, each written as the JSON escape \u0001.
        std::fs::metadata(&dlq_path).unwrap().len() < 500_000,
        "the dead letter is bounded"
    );
    let dead = read_lines(&dlq_path);
    assert_eq!(dead.len(), 1);
    assert_valid(
        &schema("dead_letter.schema.json"),
        "a dead letter",
        &dead[0],
    );
    let letter = &dead[0];
    assert_eq!(letter["reason"], "oversize");
    assert_eq!(letter["source"]["position"], 1);
    let kept = letter["payload"].as_str().unwrap().as_bytes();
    assert_eq!(kept, &huge[..64 << 10]);
    assert_eq!(letter["truncated"]["original_bytes"], huge.len());
    let sha: String = sha2::Sha256::digest(&huge)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(letter["truncated"]["original_sha256"], sha);

    // `dlq replay` does not send a prefix for the record.
    let config = tmp.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "source = \"file\"\n[file]\ninput = \"-\"\noutput = \"-\"\ndlq = {:?}\n",
            dlq_path.display()
        ),
    )
    .unwrap();
    let replay = bin()
        .args(["dlq", "replay", "--config"])
        .arg(&config)
        .arg("--to")
        .arg(tmp.path().join("replayed.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&replay.stderr);
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{stderr}");
    assert!(stderr.contains("1 skipped as truncated"), "{stderr}");
    assert!(stdout.contains("keeps only the first 65536"), "{stdout}");
}

/// `/dev/null` (as the benchmarks use it) is not a file to protect or
/// truncate: it takes the output or the dead letters.
#[test]
fn dev_null_takes_the_output_and_the_dead_letters() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"message_id\":\"m1\",\"user_id\":\"u\",\"text\":\"hi\",\"event_time\":1700000000000}\nnot json\n",
    )
    .unwrap();
    let null = Path::new("/dev/null");
    let file = tmp.path().join("f.jsonl");
    for (output, dlq) in [(null, file.as_path()), (file.as_path(), null)] {
        let out = run_example(&input, output, dlq);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 1);
    }
}
