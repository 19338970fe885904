//! Installed launcher binaries: versions, capabilities, and installation.
//!
//! A launcher is installed by *copying* it into the state directory and asking the copy
//! for its capabilities, so that what is recorded is exactly what will run, and later
//! changes to the source path do nothing.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Installation or probing failures.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The binary could not be run or copied.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// `launcher capabilities` or `--version` did not answer in time ("PATH: `ARG`").
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// This version is already installed (an installed binary is never replaced).
    #[error("launcher {0} is already installed")]
    AlreadyInstalled(String),
    /// `launcher capabilities` failed or printed something that is not a capabilities object.
    #[error("{path}: {reason}")]
    BadAnswer {
        /// The binary.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// A semantic version (`MAJOR.MINOR.PATCH[-pre][+build]`), ordered as semver says
/// (build metadata ignored, a pre-release sorts before its release).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    /// Numeric core.
    pub core: [u64; 3],
    /// Pre-release identifiers.
    pub pre: Vec<String>,
    /// The text as given.
    pub text: String,
}

impl Version {
    /// Parses a version; `None` when it is not semver-like.
    pub fn parse(s: &str) -> Option<Version> {
        let text = s.trim().to_string();
        let no_build = text.split('+').next()?;
        let (core, pre) = match no_build.split_once('-') {
            Some((c, p)) => (c, p.split('.').map(str::to_string).collect::<Vec<_>>()),
            None => (no_build, Vec::new()),
        };
        if pre.iter().any(|p| p.is_empty()) {
            return None;
        }
        let mut nums = core.split('.');
        let mut out = [0u64; 3];
        for slot in &mut out {
            let n = nums.next()?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *slot = n.parse().ok()?;
        }
        if nums.next().is_some() {
            return None;
        }
        Some(Version {
            core: out,
            pre,
            text,
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let ord = match (a.parse::<u64>(), b.parse::<u64>()) {
                            (Ok(x), Ok(y)) => x.cmp(&y),
                            (Ok(_), Err(_)) => Ordering::Less,
                            (Err(_), Ok(_)) => Ordering::Greater,
                            _ => a.cmp(b),
                        };
                        if ord != Ordering::Equal {
                            return ord;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            })
    }
}

/// Compares two version strings; unparsable versions sort lowest, by text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    match (Version::parse(a), Version::parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => a.cmp(b),
    }
}

/// What `launcher capabilities` prints (the launcher builds the same type).
pub use contracts::launcher::{Capabilities, Range};

/// A release channel (`nodectl launcher install --channel`, node setting `channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Releases for everyone.
    #[default]
    Stable,
    /// Release candidates: only nodes following `candidate` update to them.
    Candidate,
}

impl Channel {
    /// The accepted names.
    pub const NAMES: &'static [&'static str] = &["stable", "candidate"];

    /// Parses a channel name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "stable" => Some(Channel::Stable),
            "candidate" => Some(Channel::Candidate),
            _ => None,
        }
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Stable => "stable",
            Channel::Candidate => "candidate",
        }
    }

    /// Whether a node following `self` takes launchers of channel `launcher`: a
    /// candidate node also takes stable releases (they are what candidates become).
    pub fn follows(self, launcher: Channel) -> bool {
        self == Channel::Candidate || launcher == Channel::Stable
    }
}

/// One installed launcher, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstalledLauncher {
    /// Version (unique).
    pub version: String,
    /// The copy inside the state directory.
    pub path: String,
    /// Unix seconds.
    pub installed_at: i64,
    /// What it reported.
    pub capabilities: Capabilities,
    /// The channel it was installed on (records from before channels are stable).
    #[serde(default)]
    pub channel: Channel,
}

/// Parses and checks a capabilities answer.
pub fn parse_capabilities(path: &str, stdout: &[u8]) -> Result<Capabilities, LauncherError> {
    let bad = |reason: String| LauncherError::BadAnswer {
        path: path.to_string(),
        reason,
    };
    let caps: Capabilities = serde_json::from_slice(stdout).map_err(|e| {
        bad(format!(
            "`capabilities` printed something that is not a capabilities object ({e}): {:.120}",
            String::from_utf8_lossy(stdout).trim()
        ))
    })?;
    if Version::parse(&caps.version).is_none() {
        return Err(bad(format!(
            "`capabilities` reported version {:?}, which is not semver",
            caps.version
        )));
    }
    if caps.machine_types.is_empty() {
        return Err(bad("`capabilities` lists no machine types".into()));
    }
    if caps.migration_protocol.min > caps.migration_protocol.max
        || caps.snapshot_format.min > caps.snapshot_format.max
    {
        return Err(bad("`capabilities` reported an empty version range".into()));
    }
    Ok(caps)
}

/// Runs `BIN capabilities` and `BIN --version` with a timeout and checks the answers.
pub fn probe(bin: &Path, timeout: Duration) -> Result<Capabilities, LauncherError> {
    let shown = bin.display().to_string();
    let out = run_bounded(bin, "capabilities", &shown, timeout)?;
    let caps = parse_capabilities(&shown, &out)?;
    check_version_answer(bin, &shown, &caps.version, timeout)?;
    Ok(caps)
}

/// Runs `BIN --version` and checks that it names the version `capabilities` reported, so
/// that a binary answering garbage to either question is refused at install.
fn check_version_answer(
    bin: &Path,
    shown: &str,
    version: &str,
    timeout: Duration,
) -> Result<(), LauncherError> {
    let out = run_bounded(bin, "--version", shown, timeout)?;
    let text = String::from_utf8_lossy(&out);
    let text = text.trim();
    let reported = text.strip_prefix("launcher ").unwrap_or(text).trim();
    if reported != version {
        return Err(LauncherError::BadAnswer {
            path: shown.to_string(),
            reason: format!(
                "reported version {version} but `--version` printed {:.120?}",
                text
            ),
        });
    }
    Ok(())
}

/// Runs `BIN ARG`, bounded in time and output, and returns its stdout when it succeeds.
fn run_bounded(
    bin: &Path,
    arg: &str,
    shown: &str,
    timeout: Duration,
) -> Result<Vec<u8>, LauncherError> {
    let io = |source| LauncherError::Io {
        path: shown.to_string(),
        source,
    };
    // A freshly copied binary can be briefly "text file busy" when another thread forked
    // while the copy's write descriptor was open; that is transient, so retry a little.
    let mut tries = 0;
    let mut child = loop {
        match Command::new(bin)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(e)),
        }
    };
    let mut stdout = child.stdout.take();
    // Read on a thread, bounded, so a chatty or hung binary cannot block us.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(1 << 20).read_to_end(&mut out);
        }
        out
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(io)? {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LauncherError::Timeout(format!("{shown}: `{arg}`"), timeout));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = (&mut e).take(4096).read_to_string(&mut err);
        }
        return Err(LauncherError::BadAnswer {
            path: shown.to_string(),
            reason: format!("`{arg}` failed ({status}): {}", err.trim()),
        });
    }
    Ok(out)
}

/// Copies `src` into `launchers_dir/.incoming-<pid>-<n>` and probes the copy. The caller
/// (the reconciliation loop, which knows the records) then either [`commit_install`]s it
/// or removes it.
pub fn stage_copy(
    src: &Path,
    launchers_dir: &Path,
    timeout: Duration,
) -> Result<(Capabilities, PathBuf), LauncherError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| LauncherError::Io { path: p, source }
    };
    std::fs::create_dir_all(launchers_dir).map_err(io(launchers_dir))?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = launchers_dir.join(format!(".incoming-{}-{n}", std::process::id()));
    let result = (|| {
        std::fs::copy(src, &tmp).map_err(io(src))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
        probe(&tmp, timeout).map_err(|e| match e {
            // Report the user's path, not our temporary name.
            LauncherError::BadAnswer { reason, .. } => LauncherError::BadAnswer {
                path: src.display().to_string(),
                reason,
            },
            LauncherError::Timeout(_, t) => LauncherError::Timeout(src.display().to_string(), t),
            other => other,
        })
    })();
    match result {
        Ok(caps) => Ok((caps, tmp)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Moves a staged copy to `launchers_dir/<version>/launcher` (replacing a leftover of an
/// install that was interrupted before it was recorded).
pub fn commit_install(
    staged: &Path,
    launchers_dir: &Path,
    version: &str,
) -> Result<PathBuf, LauncherError> {
    let dir = launchers_dir.join(version);
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| LauncherError::Io { path: p, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let dest = dir.join("launcher");
    std::fs::rename(staged, &dest).map_err(io(&dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_order() {
        let mut v = [
            "1.10.0",
            "1.2.0",
            "1.2.0-rc.1",
            "1.2.0-rc.10",
            "1.2.0-rc.2",
            "0.9.9",
            "1.2.0-alpha",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "0.9.9",
                "1.2.0-alpha",
                "1.2.0-rc.1",
                "1.2.0-rc.2",
                "1.2.0-rc.10",
                "1.2.0",
                "1.10.0"
            ]
        );
        assert!(Version::parse("1.2").is_none());
        assert!(Version::parse("1.2.x").is_none());
        assert!(Version::parse("1.2.3-").is_none());
        assert_eq!(compare_versions("1.0.0+b1", "1.0.0+b2"), Ordering::Equal);
    }

    #[test]
    fn capabilities_checked() {
        let good = br#"{"version":"0.2.0","machineTypes":["q35-1.0"],"migrationProtocol":{"min":1,"max":2},"snapshotFormat":{"min":1,"max":1}}"#;
        assert_eq!(parse_capabilities("x", good).unwrap().version, "0.2.0");
        assert!(parse_capabilities("x", b"launcher 0.2.0").is_err());
        let bad_version = br#"{"version":"new","machineTypes":["q35-1.0"],"migrationProtocol":{"min":1,"max":2},"snapshotFormat":{"min":1,"max":1}}"#;
        assert!(parse_capabilities("x", bad_version)
            .unwrap_err()
            .to_string()
            .contains("not semver"));
        let no_mt = br#"{"version":"1.0.0","machineTypes":[],"migrationProtocol":{"min":1,"max":2},"snapshotFormat":{"min":1,"max":1}}"#;
        assert!(parse_capabilities("x", no_mt).is_err());
    }

    #[test]
    fn install_copies_and_probes_with_timeout() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("launchers-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("fake");
        std::fs::write(
            &script,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'launcher 9.1.0'; exit 0; fi\necho '{\"version\":\"9.1.0\",\"machineTypes\":[\"q35-1.0\"],\"migrationProtocol\":{\"min\":1,\"max\":1},\"snapshotFormat\":{\"min\":1,\"max\":1}}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A binary whose `--version` disagrees with its capabilities is refused.
        let liar = dir.join("liar");
        std::fs::write(
            &liar,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'garbage'; exit 0; fi\necho '{\"version\":\"9.1.0\",\"machineTypes\":[\"q35-1.0\"],\"migrationProtocol\":{\"min\":1,\"max\":1},\"snapshotFormat\":{\"min\":1,\"max\":1}}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&liar, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = stage_copy(&liar, &dir.join("launchers"), Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("`--version` printed"), "{e}");
        let (caps, staged) =
            stage_copy(&script, &dir.join("launchers"), Duration::from_secs(5)).unwrap();
        assert_eq!(caps.version, "9.1.0");
        let dest = commit_install(&staged, &dir.join("launchers"), &caps.version).unwrap();
        assert!(dest.ends_with("9.1.0/launcher"));
        let hung = dir.join("hung");
        std::fs::write(&hung, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = stage_copy(&hung, &dir.join("launchers"), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, LauncherError::Timeout(..)), "{e}");
        let e = stage_copy(
            &dir.join("missing"),
            &dir.join("launchers"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, LauncherError::Io { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
