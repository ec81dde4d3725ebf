//! `TOOL --generate KIND`: a tool's man page (roff) or shell completion script, written to
//! standard output from its clap definition, as ripgrep's `rg --generate` does. `make man
//! completions` collects them for every tool.
//!
//! ```text
//! nx-shard --generate man > nx-shard.1
//! nx-shard --generate complete-bash > /etc/bash_completion.d/nx-shard
//! ```

use std::io::{self, Write};

use clap::CommandFactory;
use clap_complete::Shell;

/// The kinds `--generate` takes.
pub const KINDS: [&str; 6] = [
    "man",
    "complete-bash",
    "complete-zsh",
    "complete-fish",
    "complete-elvish",
    "complete-powershell",
];

/// Writes what `kind` names for the command `C` to `out`.
pub fn generate<C: CommandFactory>(kind: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    if kind == "man" {
        return clap_mangen::Man::new(cmd).render(out);
    }
    let shell = match kind {
        "complete-bash" => Shell::Bash,
        "complete-zsh" => Shell::Zsh,
        "complete-fish" => Shell::Fish,
        "complete-elvish" => Shell::Elvish,
        "complete-powershell" => Shell::PowerShell,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "unknown --generate kind {kind:?}: one of {}",
                    KINDS.join(", ")
                ),
            ))
        }
    };
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}

/// If the tool was run as `TOOL --generate KIND`, writes it to stdout and exits (0, or 2 for an
/// unknown kind); otherwise returns, and the tool parses its arguments as usual. Checked before
/// parsing so the tool's required arguments need not be given.
pub fn handle_generate<C: CommandFactory>() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [flag, kind] = args.as_slice() else {
        return;
    };
    if flag != "--generate" {
        return;
    }
    crate::exit::restore_sigpipe();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match generate::<C>(kind, &mut out).and_then(|()| out.flush()) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{}: error: {e}", C::command().get_name());
            std::process::exit(crate::exit::USAGE_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Make a thing.
    #[derive(Parser)]
    #[command(name = "demo-tool")]
    struct Demo {
        /// The input.
        #[arg(long)]
        input: String,
    }

    #[test]
    fn every_kind_renders_and_names_the_tool() {
        for kind in KINDS {
            let mut out = Vec::new();
            generate::<Demo>(kind, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("demo-tool") || text.contains("demo_tool"),
                "{kind}"
            );
            assert!(text.contains("input"), "{kind}");
        }
        let mut out = Vec::new();
        assert!(generate::<Demo>("complete-tcsh", &mut out).is_err());
    }
}
