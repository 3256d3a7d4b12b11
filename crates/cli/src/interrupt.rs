//! Ctrl-C as a request to stop: long work (quantizing, training, a chat reply) checks the flag at
//! its next step and ends cleanly instead of dying halfway through a file or a line.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by Ctrl-C while the handler is armed.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// While false, Ctrl-C ends the process as it would without a handler (exit status 130), as
/// does a second Ctrl-C while the first is still unanswered.
static ARMED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    // A second Ctrl-C before the work has stopped ends the process at once.
    if ARMED.load(Ordering::SeqCst) && !INTERRUPTED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, b"\n".as_ptr().cast(), 1);
        libc::_exit(130);
    }
}

/// Installs the handler, armed: from now on Ctrl-C sets [`INTERRUPTED`].
pub fn catch() {
    arm(true);
    #[cfg(unix)]
    // SAFETY: the handler only touches atomics and async-signal-safe calls.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// Armed, Ctrl-C sets [`INTERRUPTED`]; disarmed, it ends the process.
pub fn arm(on: bool) {
    ARMED.store(on, Ordering::SeqCst);
}

/// Whether Ctrl-C came since the last call, clearing it.
pub fn take() -> bool {
    INTERRUPTED.swap(false, Ordering::SeqCst)
}
