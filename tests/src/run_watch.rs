//! A double-run detector for the node-failure tests: it follows every copy of a VM's
//! guest, on every node, through the consoles the guests write, and reports two copies
//! that make progress at the same time.
//!
//! Each running copy of a `pattern` guest prints `pass=N` lines as it goes (with
//! `every=10`, many per 100 ms); a copy that is killed, paused or not yet started prints
//! nothing. Every [`SCAN`], the watcher reads what each node's console of the VM gained
//! (a console replaced by a new file — the VM deleted and created again — is a new copy)
//! and notes which copies printed a pass. A live migration's switch-over can show the
//! outgoing and the incoming copy in one scan (one stops, the other starts within it),
//! never in two scans in a row: two copies progressing in [`OVERLAP_SCANS`] consecutive
//! scans are two copies running at once.
//!
//! It also measures the longest time no copy made progress (how long the VM was down)
//! and counts boot banners (how many times it was started).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the consoles are read.
pub const SCAN: Duration = Duration::from_millis(25);
/// Consecutive scans in which two copies must both progress to count as a double run.
pub const OVERLAP_SCANS: u32 = 2;

/// What the watcher saw.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Each double run: which copies, when (ms since the watch started).
    pub double_runs: Vec<String>,
    /// The longest stretch without progress of any copy.
    pub longest_down: Duration,
    /// Boot banners printed after the watch started (restarts).
    pub boots: usize,
    /// The nodes whose copy made progress, in order of first progress.
    pub ran_on: Vec<String>,
}

/// One console being followed: node, inode, bytes read, a partial last line.
struct Follow {
    node: String,
    inode: u64,
    offset: u64,
    partial: String,
}

/// A running watch over one VM.
pub struct RunWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<RunReport>>,
}

impl RunWatch {
    /// Watches `vm` on `nodes` (node name, that noded's state directory). Consoles that
    /// exist already are followed from their current end.
    pub fn start(vm: &str, nodes: &[(String, PathBuf)]) -> RunWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let paths: Vec<(String, PathBuf)> = nodes
            .iter()
            .map(|(n, dir)| (n.clone(), dir.join("vms").join(vm).join("console.log")))
            .collect();
        let handle = std::thread::spawn(move || watch(&paths, &s));
        RunWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and reports.
    pub fn finish(mut self) -> RunReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn read_new(path: &PathBuf, f: &mut Follow) -> (usize, usize) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return (0, 0);
    };
    if file.seek(SeekFrom::Start(f.offset)).is_err() {
        return (0, 0);
    }
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).is_err() {
        return (0, 0);
    }
    f.offset += buf.len() as u64;
    f.partial.push_str(&String::from_utf8_lossy(&buf));
    let mut passes = 0;
    let mut boots = 0;
    while let Some(i) = f.partial.find('\n') {
        let line: String = f.partial.drain(..=i).collect();
        if line.contains("pass=") {
            passes += 1;
        }
        if line.contains("pattern: booted") {
            boots += 1;
        }
    }
    (passes, boots)
}

fn watch(paths: &[(String, PathBuf)], stop: &AtomicBool) -> RunReport {
    let start = Instant::now();
    let mut follows: BTreeMap<String, Follow> = BTreeMap::new();
    // Consoles present at the start: followed from their end.
    for (node, path) in paths {
        if let Ok(m) = std::fs::metadata(path) {
            follows.insert(
                node.clone(),
                Follow {
                    node: node.clone(),
                    inode: m.ino(),
                    offset: m.len(),
                    partial: String::new(),
                },
            );
        }
    }
    let mut report = RunReport::default();
    let mut last_progress = Instant::now();
    let mut overlap = 0u32;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(SCAN);
        let mut progressed: Vec<String> = Vec::new();
        for (node, path) in paths {
            let Ok(m) = std::fs::metadata(path) else {
                follows.remove(node);
                continue;
            };
            let f = follows.entry(node.clone()).or_insert_with(|| Follow {
                node: node.clone(),
                inode: m.ino(),
                offset: 0,
                partial: String::new(),
            });
            if f.inode != m.ino() || m.len() < f.offset {
                // A new console (the VM deleted and created again here): a new copy.
                *f = Follow {
                    node: node.clone(),
                    inode: m.ino(),
                    offset: 0,
                    partial: String::new(),
                };
            }
            let (passes, boots) = read_new(path, f);
            report.boots += boots;
            if passes > 0 {
                progressed.push(f.node.clone());
            }
        }
        if progressed.is_empty() {
            report.longest_down = report.longest_down.max(last_progress.elapsed());
            overlap = 0;
            continue;
        }
        report.longest_down = report.longest_down.max(last_progress.elapsed());
        last_progress = Instant::now();
        for n in &progressed {
            if seen.insert(n.clone()) {
                report.ran_on.push(n.clone());
            }
        }
        if progressed.len() > 1 {
            overlap += 1;
            if overlap == OVERLAP_SCANS {
                report.double_runs.push(format!(
                    "copies on {progressed:?} both ran at {} ms",
                    start.elapsed().as_millis()
                ));
            }
        } else {
            overlap = 0;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &PathBuf, s: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    /// Two writers printing passes at the same time are reported; one after the other
    /// (a handover) is not. The detector itself must be able to fail.
    #[test]
    fn two_copies_at_once_are_seen_one_after_the_other_are_not() {
        let root = std::env::temp_dir().join(format!("runwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let nodes: Vec<(String, PathBuf)> = ["a", "b"]
            .iter()
            .map(|n| (n.to_string(), root.join(n)))
            .collect();
        let console = |n: &str| root.join(n).join("vms/x/console.log");
        let w = RunWatch::start("x", &nodes);
        for i in 0..10 {
            append(&console("a"), &format!("pass={i}\n"));
            std::thread::sleep(SCAN);
        }
        append(&console("b"), "pattern: booted\n");
        for i in 10..20 {
            append(&console("b"), &format!("pass={i}\n"));
            std::thread::sleep(SCAN);
        }
        let r = w.finish();
        assert!(r.double_runs.is_empty(), "{r:?}");
        assert_eq!(r.ran_on, ["a", "b"]);
        assert_eq!(r.boots, 1);
        let w = RunWatch::start("x", &nodes);
        for i in 0..20 {
            append(&console("a"), &format!("pass={i}\n"));
            append(&console("b"), &format!("pass={i}\n"));
            std::thread::sleep(SCAN);
        }
        let r = w.finish();
        assert!(!r.double_runs.is_empty(), "{r:?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
