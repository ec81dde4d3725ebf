//! Byte progress bars on stderr, shown only to a person at a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar counting bytes, or nothing at all.
///
/// It is shown only if the caller enables it (not `--quiet`), stderr is a terminal,
/// `HF_HUB_DISABLE_PROGRESS_BARS` is not true (`1`, `ON`, `YES`, `TRUE`) and `NO_PROGRESS` is not
/// set (to a non-empty value). A non-empty `NO_COLOR` turns colours off. When hidden, every
/// method is a no-op. Clones share the same bar, which many threads can update at once.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total_bytes`, labelled `label`, if `enabled` and the terminal and environment
    /// allow it.
    pub fn new(total_bytes: u64, label: &str, enabled: bool) -> Self {
        let env = |name: &str| std::env::var(name).ok();
        if !enabled || !std::io::stderr().is_terminal() || disabled_by_env(&env) {
            return Progress { bar: None };
        }
        let style = ProgressStyle::with_template(template(!is_set(&env, "NO_COLOR")))
            .expect("the progress templates are valid")
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_message(label.to_string());
        Progress { bar: Some(bar) }
    }

    /// Counts `bytes` more as done.
    pub fn inc(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// Replaces the label, e.g. with counts and rates of the tool's own units.
    pub fn set_message(&self, message: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message());
        }
    }

    /// Marks the work finished, leaving the completed bar on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Whether the environment asks for no progress bars.
fn disabled_by_env(env: &dyn Fn(&str) -> Option<String>) -> bool {
    let hf_disabled = env("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|value| {
        ["1", "ON", "YES", "TRUE"]
            .iter()
            .any(|t| value.trim().eq_ignore_ascii_case(t))
    });
    hf_disabled || is_set(env, "NO_PROGRESS")
}

/// Whether `name` is set to a non-empty value (the `NO_COLOR` convention).
fn is_set(env: &dyn Fn(&str) -> Option<String>, name: &str) -> bool {
    env(name).is_some_and(|value| !value.is_empty())
}

fn template(colour: bool) -> &'static str {
    if colour {
        "{msg} [{wide_bar:.cyan/blue}] {decimal_bytes}/{decimal_total_bytes} \
         {decimal_bytes_per_sec} eta {eta}"
    } else {
        "{msg} [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_switches() {
        assert!(!disabled_by_env(&env_of(&[])));
        assert!(!disabled_by_env(&env_of(&[(
            "HF_HUB_DISABLE_PROGRESS_BARS",
            "0"
        )])));
        assert!(!disabled_by_env(&env_of(&[("NO_PROGRESS", "")])));
        assert!(disabled_by_env(&env_of(&[(
            "HF_HUB_DISABLE_PROGRESS_BARS",
            "1"
        )])));
        assert!(disabled_by_env(&env_of(&[(
            "HF_HUB_DISABLE_PROGRESS_BARS",
            "true"
        )])));
        assert!(disabled_by_env(&env_of(&[("NO_PROGRESS", "1")])));
        assert!(is_set(&env_of(&[("NO_COLOR", "1")]), "NO_COLOR"));
        assert!(!is_set(&env_of(&[("NO_COLOR", "")]), "NO_COLOR"));
    }

    #[test]
    fn templates_are_valid_and_plain_one_has_no_colour() {
        for colour in [true, false] {
            assert!(ProgressStyle::with_template(template(colour)).is_ok());
        }
        assert!(!template(false).contains(':'));
    }

    #[test]
    fn hidden_bar_is_a_shareable_no_op() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Progress>();
        // Tests never run with stderr as the terminal of a person, or are told not to be quiet.
        let progress = Progress::new(10, "hashing", false);
        assert!(progress.bar.is_none());
        std::thread::scope(|s| {
            s.spawn(|| progress.inc(4));
            s.spawn(|| progress.inc(6));
        });
        progress.finish();
    }
}
