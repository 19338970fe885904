//! `nodectl completion SHELL` (clap_complete) and `nodectl man DIR` (clap_mangen): both
//! generated from the same clap definition as the parser, so they never drift.

use std::path::Path;

use clap::CommandFactory;

use super::Cli;

/// Prints the completion script for `shell` on stdout.
pub fn completion(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "nodectl", &mut std::io::stdout());
}

/// Writes `nodectl.1` and one page per subcommand (`nodectl-vm.1`, ...) into `dir`.
pub fn man(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nodectl") && n.ends_with(".1"))
        .collect();
    names.sort();
    for n in names {
        println!("{}", dir.join(n).display());
    }
    Ok(())
}
