//! What the cluster tasks keep across a noded restart: the node's lease id and its
//! peers' addresses. A noded that restarts while etcd is out of reach still knows
//! which lease to ask its peers about, and whom to ask (fence.rs).

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

const FILE: &str = "cluster.json";

/// The saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Saved {
    /// The node's lease in etcd.
    pub lease: Option<i64>,
    /// Peers: node name, peer-check address.
    pub peers: Vec<(String, SocketAddr)>,
}

/// Loads the saved state; a missing or damaged file is an empty state (logged).
pub fn load(dir: &Path) -> Saved {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, path = %path.display(), "ignoring a damaged cluster state file");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// Saves it (write to a temporary file, then rename: never half a file).
pub fn save(dir: &Path, s: &Saved) {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let Ok(bytes) = serde_json::to_vec(s) else {
        return;
    };
    if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)) {
        tracing::warn!(error = %e, path = %path.display(), "cannot save the cluster state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let dir = std::env::temp_dir().join(format!("persisted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir), Saved::default());
        let s = Saved {
            lease: Some(42),
            peers: vec![("b".into(), "10.0.0.2:4800".parse().unwrap())],
        };
        save(&dir, &s);
        assert_eq!(load(&dir), s);
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(load(&dir), Saved::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
