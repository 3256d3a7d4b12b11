//! `camelid chat` with piped turns on the default model: commands, turns dropped to fit a small
//! window, and the errors for a message or a window that cannot fit.

use camelid_model::catalog;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn default_model() -> PathBuf {
    let entry = catalog::find(catalog::DEFAULT_MODEL).expect("default model");
    catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull the default model")
}

/// `camelid chat -m MODEL --temperature 0 ARGS` with `input` on stdin.
fn chat(args: &[&str], input: &str) -> Output {
    let model = default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .arg("chat")
        .arg("-m")
        .arg(&model)
        .args(["--temperature", "0"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run camelid chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the turns");
    child.wait_with_output().expect("camelid chat output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn clear_forgets_the_conversation_and_exit_ends_it() {
    let out = chat(
        &["-n", "12"],
        "Name a color.\n/clear\n/help\nName a fruit.\n/exit\nName a city.\n",
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(replies.len(), 2, "two turns before /exit: {stdout:?}");
    assert!(stderr.contains("[the conversation is cleared]"), "{stderr}");
    assert!(
        stderr.contains("/clear   forget the conversation"),
        "{stderr}"
    );

    // After /clear the model sees the second question alone.
    let alone = chat(&["-n", "12"], "Name a fruit.\n");
    assert!(alone.status.success(), "{}", text(&alone.stderr));
    assert_eq!(text(&alone.stdout).trim_end(), replies[1]);
    // Without /clear it sees both turns, and (greedy) answers the same only by chance: the
    // check above would then prove nothing, so make sure the history does change the reply.
    let both = chat(&["-n", "12"], "Name a color.\nName a fruit.\n");
    let both = text(&both.stdout);
    assert_ne!(both.lines().nth(1), Some(replies[1]), "{both:?}");
}

#[test]
fn the_oldest_turns_are_dropped_to_fit_the_window() {
    let turns = "Tell me about camels.\nAnd llamas?\nAnd alpacas?\n";
    let out = chat(&["-n", "30", "-c", "120", "--system", "Be brief."], turns);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout:?}");
    assert!(
        stderr.contains("oldest messages were dropped to fit the 120-token window"),
        "{stderr}"
    );
    // With the model's whole window nothing is dropped.
    let whole = chat(&["-n", "30", "--system", "Be brief."], turns);
    assert!(whole.status.success());
    assert!(!text(&whole.stderr).contains("dropped"));
}

#[test]
fn a_message_or_a_window_that_cannot_fit_is_an_error() {
    let long = format!("{}\n", "camel ".repeat(200));
    let out = chat(&["-n", "20", "-c", "100"], &long);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the 100-token window holds 80"),
        "names the window and the room: {stderr}"
    );

    let out = chat(&["-c", "1000000"], "hello\n");
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--context 1000000 is larger than"),
        "{stderr}"
    );
}

/// A pseudo-terminal: the end a person types into, and the end a program reads as stdin.
#[cfg(unix)]
fn terminal() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors, owned from here on.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are open and owned by nobody else.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(m)),
            OwnedFd::from_raw_fd(s),
        )
    }
}

/// At a terminal, Ctrl-C stops the reply and the chat goes on; at the prompt it ends the chat.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_reply_at_a_terminal_and_the_chat_goes_on() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    // stdin is a pseudo-terminal, so chat runs as it does for a person; Ctrl-C is the SIGINT
    // the terminal would send.
    let (mut master, slave) = terminal();
    let mut child = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .arg("chat")
        .arg("-m")
        .arg(default_model())
        .args(["-n", "4000", "--ignore-eos"])
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run camelid chat");
    let mut stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::BufReader::new(stderr)
            .read_to_string(&mut s)
            .map(|_| s)
    });
    master
        .write_all(b"Tell me a long story about a camel.\n")
        .expect("type");
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    let start = Instant::now();
    while reply.len() < 40 {
        let n = stdout.read(&mut buf).expect("read the reply");
        assert!(n > 0, "the reply ended early");
        reply.extend_from_slice(&buf[..n]);
        assert!(start.elapsed() < Duration::from_secs(120), "no reply");
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    // The reply ends (a newline); the chat waits at the prompt for the next line.
    while !reply.ends_with(b"\n") {
        let n = stdout.read(&mut buf).expect("read the reply");
        assert!(n > 0, "chat ended instead of stopping the reply");
        reply.extend_from_slice(&buf[..n]);
    }
    master.write_all(b"/exit\n").expect("type /exit");
    let status = child.wait().expect("wait");
    let stderr = err.join().expect("stderr thread").expect("stderr");
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("[stopped]"), "{stderr}");
    assert!(reply.len() < 4000, "the reply stopped early");
    drop(master);

    // Ctrl-C at the prompt ends the chat, as it would without camelid's handler.
    let (_master, slave) = terminal();
    let mut child = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .arg("chat")
        .arg("-m")
        .arg(default_model())
        .stdin(Stdio::from(slave))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run camelid chat");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("> ") {
        let n = stderr.read(&mut buf).expect("read the banner");
        assert!(n > 0, "chat ended before its prompt");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{status}");
}

/// Negative numbers are values, not flags: penalties may be negative (as OpenAI allows), and a
/// negative temperature reaches the range check instead of a parsing error.
#[test]
fn negative_sampling_values_are_read_as_numbers() {
    let out = chat(
        &[
            "-n",
            "4",
            "--presence-penalty",
            "-0.5",
            "--frequency-penalty",
            "-1",
        ],
        "Hi\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args(["run", "-m"])
        .arg(default_model())
        .args(["--temperature", "-1", "hi"])
        .output()
        .expect("run camelid run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("temperature must be >= 0, got -1"),
        "{}",
        text(&out.stderr)
    );
}

/// A message of several lines between `"""` fences is one message: the fence on its own lines
/// and the fence around the text give the same reply, and it differs from sending the lines
/// one by one.
#[test]
fn a_fenced_message_of_several_lines_is_one_turn() {
    let alone = chat(
        &["-n", "12"],
        "\"\"\"\nName three colors,\nthen stop.\n\"\"\"\n/exit\n",
    );
    let inline = chat(
        &["-n", "12"],
        "\"\"\"Name three colors,\nthen stop.\"\"\"\n",
    );
    assert!(alone.status.success(), "{}", text(&alone.stderr));
    assert!(inline.status.success(), "{}", text(&inline.stderr));
    assert_eq!(text(&alone.stdout), text(&inline.stdout));
    let split = chat(&["-n", "12"], "Name three colors,\nthen stop.\n");
    assert_ne!(text(&split.stdout), text(&alone.stdout));
}

/// A reader that goes away (`| head -c 5`) ends `run` and `chat` quietly: exit 0, no panic,
/// and chat stops taking turns.
#[test]
fn a_closed_stdout_ends_run_and_chat_quietly() {
    use std::io::Read;
    for (args, input) in [
        (
            vec!["run", "--ignore-eos", "-n", "200", "Once upon a time"],
            "",
        ),
        (
            vec!["chat", "--ignore-eos", "-n", "200", "--stats"],
            "Hi\nHello\nHey\n",
        ),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_camelid"))
            .args(&args)
            .arg("-m")
            .arg(default_model())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run camelid");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 5];
        stdout.read_exact(&mut first).expect("the first bytes");
        drop(stdout);
        let out = child.wait_with_output().expect("wait");
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}\n{stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.matches("[prompt:").count() <= 1,
            "chat went on after its reader left: {stderr}"
        );
    }
}
