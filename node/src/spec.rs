//! VM specs: parsing and validation of the user's YAML/JSON, with KubeVirt field names.
//!
//! Parsing is done field by field from a JSON value (YAML is converted first) rather than
//! with one `#[derive(Deserialize)]`, so that every error names the field and says why
//! ("memory: \"64Q\" is not a quantity ..."), which is what a user fixing a spec needs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A spec that cannot be accepted, with the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The document is not YAML/JSON, or not an object.
    #[error("invalid spec: {0}")]
    Syntax(String),
    /// A field has a bad value.
    #[error("invalid spec: {field}: {reason}")]
    Field {
        /// Dotted path of the field, e.g. `disks[0].shared`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// KubeVirt's `runStrategy`: what happens when a VM's launcher ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RunStrategy {
    /// Restart whenever the VM ends.
    #[default]
    Always,
    /// Restart only after a failure (and, here, after an eviction for an update).
    RerunOnFailure,
    /// Only explicit start/stop.
    Manual,
    /// Keep stopped.
    Halted,
    /// Run once, never restart.
    Once,
}

impl RunStrategy {
    const NAMES: &'static [&'static str] =
        &["Always", "RerunOnFailure", "Manual", "Halted", "Once"];
}

/// KubeVirt's `evictionStrategy`: what an eviction means for this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EvictionStrategy {
    /// Eviction just stops the VM.
    #[default]
    None,
    /// Eviction is refused unless the VM can migrate; then it migrates.
    LiveMigrate,
    /// Migrate if possible, else stop.
    LiveMigrateIfPossible,
}

impl EvictionStrategy {
    const NAMES: &'static [&'static str] = &["None", "LiveMigrate", "LiveMigrateIfPossible"];
}

/// A data disk: a raw file attached as virtio-blk (`launcher run --disk`). The launcher
/// takes an OFD lock on it and hands the lock over at a migration's switch-over, so the
/// file is never written by two launchers at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Disk name, unique in the VM.
    pub name: String,
    /// Backing file on the host (absolute).
    pub path: String,
    /// Whether the storage is shared between hosts: a non-shared disk does not block an
    /// update on this node (the new launcher reaches the same file), only moves to other
    /// hosts (`DisksNotLiveMigratable`).
    #[serde(default)]
    pub shared: bool,
    /// Read-only attachment.
    #[serde(default, alias = "readOnly")]
    pub readonly: bool,
}

impl Disk {
    /// The `launcher run --disk` value.
    pub fn launcher_arg(&self) -> contracts::launch::DiskArg {
        contracts::launch::DiskArg {
            path: self.path.clone(),
            readonly: self.readonly,
            shared: self.shared,
        }
    }
}

/// Most network interfaces per VM: the launcher's limit (one PCI slot each).
pub const MAX_INTERFACES: usize = contracts::limits::MAX_NETS;

/// A network interface: virtio-net on an existing persistent TAP device on this node
/// (`launcher run --net tap=NAME,mac=MAC`). The TAP is created by the operator (`ip tuntap
/// add dev NAME mode tap user USER`); noded needs no network privileges. The MAC is
/// chosen once, at creation, when the spec gives none, and stored: the guest keeps it in
/// every launcher it ever runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Name of the TAP device (1 to 15 bytes); one VM per TAP.
    pub tap: String,
    /// Guest MAC (`aa:bb:cc:dd:ee:ff`, unicast); always set in a stored spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Interface {
    /// The `launcher run --net` value (a stored spec's MAC is always valid).
    pub fn launcher_arg(&self) -> contracts::launch::NetArg {
        contracts::launch::NetArg {
            backend: contracts::launch::NetBackend::Tap(self.tap.clone()),
            mac: self
                .mac
                .as_deref()
                .and_then(|m| contracts::limits::parse_mac(m).ok()),
        }
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:`, `,`, `=` or whitespace (the last
/// two would break the launcher's `--net` syntax).
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s.bytes().any(|b| {
            matches!(b, b'/' | b':' | b',' | b'=' | 0) || b.is_ascii_whitespace() || !b.is_ascii()
        })
}

/// A host device. Today only a marker: any host device makes the VM not live-migratable,
/// as in KubeVirt, which is how tests get non-migratable VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostDevice {
    /// Name in the VM.
    pub name: String,
    /// Host resource name.
    #[serde(default)]
    pub device_name: Option<String>,
}

/// A validated VM spec, as stored and as shown by `nodectl vm get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    /// DNS-1123 label, unique on the node.
    pub name: String,
    /// Guest kernel (PVH ELF or bzImage) path.
    pub kernel: String,
    /// Guest command line.
    #[serde(default)]
    pub cmdline: String,
    /// Memory as written by the user ("64Mi").
    pub memory: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Machine type; resolved to a versioned name at creation, never changed by updates.
    pub machine_type: String,
    /// See [`RunStrategy`].
    pub run_strategy: RunStrategy,
    /// See [`EvictionStrategy`].
    pub eviction_strategy: EvictionStrategy,
    /// Seconds between a graceful shutdown request and SIGKILL (KubeVirt's name).
    pub termination_grace_period_seconds: u64,
    /// Data disks, in PCI slot order.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Host devices (marker only).
    #[serde(default)]
    pub host_devices: Vec<HostDevice>,
    /// Network interfaces, in PCI slot order.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
}

/// Whether a VM can be live-migrated, and why (KubeVirt's `LiveMigratable` condition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migratability {
    /// Live migration to another launcher on this node possible.
    pub migratable: bool,
    /// Reason code when not migratable.
    pub reason: Option<String>,
    /// Reason code a move to *another host* would be refused for (KubeVirt's names, e.g.
    /// `DisksNotLiveMigratable`). Informational today: noded only updates in place.
    pub cross_host_reason: Option<String>,
}

impl VmSpec {
    /// Derives migratability from the spec: host devices block live migration; local
    /// (non-shared) disks do not, because on this node the new launcher reaches them
    /// (local handover), but they would block a move to another host.
    pub fn migratability(&self) -> Migratability {
        let host_devices =
            (!self.host_devices.is_empty()).then(|| "HostDevicesNotLiveMigratable".to_string());
        let cross_host_reason = host_devices.clone().or_else(|| {
            self.disks
                .iter()
                .any(|d| !d.shared)
                .then(|| "DisksNotLiveMigratable".to_string())
        });
        Migratability {
            migratable: host_devices.is_none(),
            reason: host_devices,
            cross_host_reason,
        }
    }
}

impl VmSpec {
    /// The fields that differ from `new` and only take effect when a launcher starts (the
    /// machine a running guest sees cannot change under it); empty when none do.
    pub fn restart_changes(&self, new: &VmSpec) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut diff = |changed: bool, name: &'static str| {
            if changed {
                out.push(name);
            }
        };
        diff(self.machine_type != new.machine_type, "machineType");
        diff(self.kernel != new.kernel, "kernel");
        diff(self.cmdline != new.cmdline, "cmdline");
        diff(self.memory_bytes != new.memory_bytes, "memory");
        diff(self.vcpus != new.vcpus, "vcpus");
        diff(self.disks != new.disks, "disks");
        diff(self.host_devices != new.host_devices, "hostDevices");
        diff(self.interfaces != new.interfaces, "interfaces");
        out
    }

    /// Gives every interface without a MAC one, once: the MAC of `previous`'s interface
    /// on the same TAP when there is one (an edit that omits the MAC keeps it), else a new
    /// random locally administered unicast address (`52:54:00:xx:xx:xx`) that no other
    /// interface of this VM has. Called when a spec is created or replaced, so that the
    /// stored spec always has MACs and a launcher never picks one.
    pub fn assign_macs(&mut self, previous: Option<&VmSpec>) {
        for i in 0..self.interfaces.len() {
            if self.interfaces[i].mac.is_some() {
                continue;
            }
            let taken =
                |m: &str, s: &VmSpec| s.interfaces.iter().any(|o| o.mac.as_deref() == Some(m));
            let kept = previous
                .and_then(|p| {
                    p.interfaces
                        .iter()
                        .find(|o| o.tap == self.interfaces[i].tap)
                })
                .and_then(|o| o.mac.clone())
                .filter(|m| !taken(m, self));
            let mac = kept.unwrap_or_else(|| loop {
                let m = contracts::limits::format_mac(&contracts::limits::random_mac());
                if !taken(&m, self) {
                    break m;
                }
            });
            self.interfaces[i].mac = Some(mac);
        }
    }

    /// Why this spec's interfaces cannot coexist with `others` (the other VMs' specs,
    /// pending ones included): a TAP can only be attached to one VM, and two VMs with one
    /// MAC would confuse the network.
    pub fn interface_conflict<'a>(
        &self,
        others: impl IntoIterator<Item = &'a VmSpec>,
    ) -> Option<SpecError> {
        for o in others {
            if o.name == self.name {
                continue;
            }
            for (i, n) in self.interfaces.iter().enumerate() {
                if o.interfaces.iter().any(|x| x.tap == n.tap) {
                    return Some(field_err(
                        format!("interfaces[{i}].tap"),
                        format!("TAP {:?} is already used by VM {}", n.tap, o.name),
                    ));
                }
                if n.mac.is_some() && o.interfaces.iter().any(|x| x.mac == n.mac) {
                    return Some(field_err(
                        format!("interfaces[{i}].mac"),
                        format!(
                            "{} is already the MAC of VM {}",
                            n.mac.as_deref().unwrap_or_default(),
                            o.name
                        ),
                    ));
                }
            }
        }
        None
    }

    /// This spec with the fields that apply at once (strategies, grace period) taken from
    /// `new`: they only matter when a launcher ends or an update is decided.
    pub fn with_live_fields(&self, new: &VmSpec) -> VmSpec {
        VmSpec {
            run_strategy: new.run_strategy,
            eviction_strategy: new.eviction_strategy,
            termination_grace_period_seconds: new.termination_grace_period_seconds,
            ..self.clone()
        }
    }
}

/// Parses a Kubernetes quantity such as `64Mi`, `1G`, `512M`, `1048576` into bytes
/// (the project's one grammar: `contracts::quantity`).
pub fn parse_quantity(s: &str) -> Result<u64, contracts::quantity::QuantityError> {
    contracts::quantity::parse(s)
}

/// Parses a spec document (YAML or JSON text).
pub fn parse_spec_text(text: &str) -> Result<VmSpec, SpecError> {
    let value: Value =
        serde_norway::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
    parse_spec(&value)
}

const KNOWN_FIELDS: &[&str] = &[
    "name",
    "kernel",
    "cmdline",
    "memory",
    "vcpus",
    "machineType",
    "runStrategy",
    "evictionStrategy",
    "terminationGracePeriodSeconds",
    "disks",
    "hostDevices",
    "interfaces",
];

fn get_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>, SpecError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(field_err(key, format!("must be a string, got {other}"))),
    }
}

fn get_enum<T: for<'de> Deserialize<'de>>(
    map: &Map<String, Value>,
    key: &str,
    names: &[&str],
) -> Result<Option<T>, SpecError> {
    match get_str(map, key)? {
        None => Ok(None),
        Some(s) => serde_json::from_value(Value::String(s.clone()))
            .map(Some)
            .map_err(|_| field_err(key, format!("{s:?} is not one of {}", names.join(", ")))),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Validates a spec given as a JSON value. `machineType` is returned as written (default
/// `q35`); resolving it to a versioned name needs the target launcher and is done by
/// [`resolve_machine_type`].
pub fn parse_spec(value: &Value) -> Result<VmSpec, SpecError> {
    let map = value
        .as_object()
        .ok_or_else(|| SpecError::Syntax("the spec must be a mapping of fields".into()))?;
    if let Some(unknown) = map.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(field_err(
            unknown.as_str(),
            format!("unknown field (known: {})", KNOWN_FIELDS.join(", ")),
        ));
    }
    let name = get_str(map, "name")?.ok_or_else(|| field_err("name", "required"))?;
    if !is_dns_label(&name) {
        return Err(field_err(
            "name",
            format!("{name:?} must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'"),
        ));
    }
    let kernel = get_str(map, "kernel")?.ok_or_else(|| field_err("kernel", "required"))?;
    if kernel.is_empty() {
        return Err(field_err("kernel", "must not be empty"));
    }
    if !std::path::Path::new(&kernel).is_absolute() {
        return Err(field_err(
            "kernel",
            format!("{kernel:?} must be an absolute path"),
        ));
    }
    let cmdline = get_str(map, "cmdline")?.unwrap_or_default();
    let memory = match map.get("memory") {
        None | Some(Value::Null) => return Err(field_err("memory", "required (e.g. 64Mi)")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(field_err(
                "memory",
                format!("must be a quantity, got {other}"),
            ))
        }
    };
    let memory_bytes = parse_quantity(&memory).map_err(|e| field_err("memory", e.to_string()))?;
    // Decimal units ("1G") are rarely page multiples: round up to whole 4 KiB pages.
    let memory_bytes = memory_bytes.div_ceil(4096) * 4096;
    // The launcher's own limits (contracts::limits): a spec noded accepts must boot.
    contracts::limits::check_memory(memory_bytes)
        .map_err(|e| field_err("memory", format!("{memory:?}: {e}")))?;
    let vcpus = match map.get("vcpus") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .and_then(|n| contracts::limits::check_vcpus(n).ok())
            .map(u32::from)
            .ok_or_else(|| {
                field_err(
                    "vcpus",
                    format!(
                        "{v} must be an integer from 1 to {}",
                        contracts::limits::MAX_VCPUS
                    ),
                )
            })?,
    };
    let machine_type = get_str(map, "machineType")?.unwrap_or_else(|| "q35".into());
    if machine_type.is_empty() {
        return Err(field_err("machineType", "must not be empty"));
    }
    let run_strategy =
        get_enum(map, "runStrategy", RunStrategy::NAMES)?.unwrap_or(RunStrategy::Always);
    let eviction_strategy = get_enum(map, "evictionStrategy", EvictionStrategy::NAMES)?
        .unwrap_or(EvictionStrategy::None);
    let termination_grace_period_seconds = match map.get("terminationGracePeriodSeconds") {
        None | Some(Value::Null) => 30,
        Some(v) => v.as_u64().filter(|n| *n <= 3600).ok_or_else(|| {
            field_err(
                "terminationGracePeriodSeconds",
                format!("{v} must be an integer from 0 to 3600"),
            )
        })?,
    };
    let disks: Vec<Disk> = list_field(map, "disks")?;
    check_disks(&disks)?;
    let host_devices: Vec<HostDevice> = list_field(map, "hostDevices")?;
    let mut interfaces: Vec<Interface> = list_field(map, "interfaces")?;
    check_interfaces(&mut interfaces)?;
    Ok(VmSpec {
        name,
        kernel,
        cmdline,
        memory,
        memory_bytes,
        vcpus,
        machine_type,
        run_strategy,
        eviction_strategy,
        termination_grace_period_seconds,
        disks,
        host_devices,
        interfaces,
    })
}

/// Checks the interfaces and normalizes their MACs to `aa:bb:cc:dd:ee:ff`.
fn check_interfaces(interfaces: &mut [Interface]) -> Result<(), SpecError> {
    if interfaces.len() > MAX_INTERFACES {
        return Err(field_err(
            "interfaces",
            format!("{} interfaces; at most {MAX_INTERFACES}", interfaces.len()),
        ));
    }
    for i in 0..interfaces.len() {
        let tap = &interfaces[i].tap;
        if !valid_ifname(tap) {
            return Err(field_err(
                format!("interfaces[{i}].tap"),
                format!(
                    "{tap:?} is not a TAP name (1 to 15 bytes, no '/', ':', ',', '=' or spaces)"
                ),
            ));
        }
        if interfaces[..i].iter().any(|o| &o.tap == tap) {
            return Err(field_err(
                format!("interfaces[{i}].tap"),
                format!("TAP {tap:?} is given twice"),
            ));
        }
        if let Some(mac) = &interfaces[i].mac {
            let field = format!("interfaces[{i}].mac");
            let parsed = contracts::limits::parse_mac(mac.trim())
                .map_err(|e| field_err(field.clone(), e.to_string()))?;
            let mac = contracts::limits::format_mac(&parsed);
            if interfaces[..i]
                .iter()
                .any(|o| o.mac.as_deref() == Some(mac.as_str()))
            {
                return Err(field_err(field, format!("{mac} is given twice")));
            }
            interfaces[i].mac = Some(mac);
        }
    }
    Ok(())
}

/// Most data disks per VM (the launcher's limit: one PCI slot and IOAPIC pin each).
pub const MAX_DISKS: usize = contracts::limits::MAX_DISKS;

fn check_disks(disks: &[Disk]) -> Result<(), SpecError> {
    if disks.len() > MAX_DISKS {
        return Err(field_err(
            "disks",
            format!("{} disks; at most {MAX_DISKS}", disks.len()),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut paths = std::collections::BTreeSet::new();
    for (i, d) in disks.iter().enumerate() {
        if !names.insert(d.name.clone()) {
            return Err(field_err(
                format!("disks[{i}].name"),
                format!("duplicate disk {:?}", d.name),
            ));
        }
        let field = format!("disks[{i}].path");
        if !std::path::Path::new(&d.path).is_absolute() {
            return Err(field_err(
                field,
                format!("{:?} must be an absolute path", d.path),
            ));
        }
        // The launcher's `--disk` syntax separates options with commas.
        if d.path.contains(',') {
            return Err(field_err(
                field,
                format!("{:?} must not contain ','", d.path),
            ));
        }
        if !paths.insert(d.path.clone()) {
            return Err(field_err(
                field,
                format!(
                    "{:?} is attached twice (each disk is locked by its launcher)",
                    d.path
                ),
            ));
        }
    }
    Ok(())
}

fn list_field<T: for<'de> Deserialize<'de>>(
    map: &Map<String, Value>,
    key: &str,
) -> Result<Vec<T>, SpecError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item.clone())
                    .map_err(|e| field_err(format!("{key}[{i}]"), e.to_string()))
            })
            .collect(),
        Some(other) => Err(field_err(key, format!("must be a list, got {other}"))),
    }
}

/// Resolves a machine type against the list a launcher offers (first entry preferred):
/// an exact name is kept; an unversioned alias (`q35`) becomes the first listed name
/// that starts with `q35-`.
pub fn resolve_machine_type(requested: &str, offered: &[String]) -> Result<String, SpecError> {
    if offered.iter().any(|m| m == requested) {
        return Ok(requested.to_string());
    }
    let prefix = format!("{requested}-");
    offered
        .iter()
        .find(|m| m.starts_with(&prefix))
        .cloned()
        .ok_or_else(|| {
            field_err(
                "machineType",
                format!(
                    "{requested:?} is not offered by the target launcher (it offers: {})",
                    offered.join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: demo\nkernel: /guests/pattern.elf\ncmdline: every=10\nmemory: 64Mi\nvcpus: 2\nrunStrategy: RerunOnFailure\nevictionStrategy: LiveMigrateIfPossible\n";

    #[test]
    fn parses_yaml_and_defaults() {
        let s = parse_spec_text(GOOD).unwrap();
        assert_eq!(s.memory_bytes, 64 << 20);
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.machine_type, "q35");
        assert_eq!(s.run_strategy, RunStrategy::RerunOnFailure);
        assert_eq!(s.eviction_strategy, EvictionStrategy::LiveMigrateIfPossible);
        assert_eq!(s.termination_grace_period_seconds, 30);
        assert!(s.migratability().migratable);
        let j = parse_spec_text(r#"{"name":"a","kernel":"/k","memory":"1G"}"#).unwrap();
        assert_eq!(j.run_strategy, RunStrategy::Always);
        assert_eq!(j.eviction_strategy, EvictionStrategy::None);
        assert_eq!(j.vcpus, 1);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("kernel: /k\nmemory: 64Mi", "name: required"),
            ("name: Bad_Name\nkernel: /k\nmemory: 64Mi", "name:"),
            ("name: a\nkernel: k\nmemory: 64Mi", "kernel:"),
            (
                "name: a\nkernel: /k\nmemory: 64Q",
                "memory: \"64Q\" is not a quantity: unknown suffix \"Q\"",
            ),
            ("name: a\nkernel: /k", "memory: required"),
            ("name: a\nkernel: /k\nmemory: 64Mi\nvcpus: 0", "vcpus:"),
            // The launcher's limits (defect: noded accepted what the launcher refuses).
            (
                "name: a\nkernel: /k\nmemory: 64Mi\nvcpus: 255",
                "vcpus: 255 must be an integer from 1 to 254",
            ),
            (
                "name: a\nkernel: /k\nmemory: 1Mi",
                "memory: \"1Mi\": 1048576 bytes of memory is too small: at least 2 MiB",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\nrunStrategy: Sometimes",
                "runStrategy: \"Sometimes\" is not one of",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\nevictionStrategy: External",
                "evictionStrategy:",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\nfoo: 1",
                "foo: unknown field",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d, shard: true}]",
                "disks[0]",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d, path: /a}, {name: d, path: /b}]",
                "disks[1].name",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d}]",
                "disks[0]: missing field `path`",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d, path: rel.img}]",
                "disks[0].path: \"rel.img\" must be an absolute path",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d, path: \"/a,b\"}]",
                "disks[0].path",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ndisks: [{name: d, path: /a}, {name: e, path: /a}]",
                "disks[1].path",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\nhostDevices: 3",
                "hostDevices: must be a list",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: \"\"}]",
                "interfaces[0].tap: \"\" is not a TAP name",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: a-very-long-tap-name}]",
                "interfaces[0].tap",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: \"t,mac=x\"}]",
                "interfaces[0].tap",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0, mac: \"52:54:00:12:34\"}]",
                "interfaces[0].mac: 52:54:00:12:34 is not a MAC address",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0, mac: \"01:00:5e:00:00:01\"}]",
                "interfaces[0].mac: 01:00:5e:00:00:01 is a multicast address",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0}, {tap: t0}]",
                "interfaces[1].tap: TAP \"t0\" is given twice",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0, mac: \"52:54:00:00:00:01\"}, {tap: t1, mac: \"52-54-00-00-00-01\"}]",
                "interfaces[1].mac: 52:54:00:00:00:01 is given twice",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: t0, model: e1000}]",
                "interfaces[0]: unknown field `model`",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{mac: \"52:54:00:00:00:01\"}]",
                "interfaces[0]: missing field `tap`",
            ),
            (
                "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: {tap: t0}",
                "interfaces: must be a list",
            ),
            ("- 1", "must be a mapping"),
            ("name: [", "invalid spec"),
        ];
        for (text, want) in cases {
            let e = parse_spec_text(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert!(parse_quantity("Mi").is_err());
        assert!(parse_quantity("1.5Gi").is_err());
        assert!(parse_quantity("99999999999999999999Ti").is_err());
    }

    #[test]
    fn migratability_from_host_devices_and_disks() {
        let mut s = parse_spec_text(GOOD).unwrap();
        s.disks.push(Disk {
            name: "root".into(),
            path: "/img/root.raw".into(),
            shared: false,
            readonly: false,
        });
        let m = s.migratability();
        assert!(
            m.migratable,
            "a local disk does not block an update on this node"
        );
        assert_eq!(m.reason, None);
        assert_eq!(
            m.cross_host_reason.as_deref(),
            Some("DisksNotLiveMigratable")
        );
        s.disks[0].shared = true;
        assert_eq!(s.migratability().cross_host_reason, None);
        s.host_devices.push(HostDevice {
            name: "gpu".into(),
            device_name: None,
        });
        let m = s.migratability();
        assert!(!m.migratable);
        assert_eq!(m.reason.as_deref(), Some("HostDevicesNotLiveMigratable"));
    }

    #[test]
    fn disks_parse_and_become_launcher_args() {
        let s = parse_spec_text(
            "name: a\nkernel: /k\nmemory: 64Mi\ndisks:\n- {name: j, path: /d/j.img}\n- {name: r, path: /d/r.img, readonly: true, shared: true}\n- {name: o, path: /d/o.img, readOnly: true}\n",
        )
        .unwrap();
        let args: Vec<String> = s.disks.iter().map(|d| d.launcher_arg().to_arg()).collect();
        assert_eq!(
            args,
            [
                "path=/d/j.img",
                "path=/d/r.img,readonly=on,shared=on",
                "path=/d/o.img,readonly=on"
            ]
        );
    }

    #[test]
    fn restart_changes_and_live_fields() {
        let a = parse_spec_text(GOOD).unwrap();
        let mut b = a.clone();
        assert!(a.restart_changes(&b).is_empty());
        b.machine_type = "q35-2.0".into();
        b.run_strategy = RunStrategy::Manual;
        assert_eq!(a.restart_changes(&b), ["machineType"]);
        let live = a.with_live_fields(&b);
        assert_eq!(live.run_strategy, RunStrategy::Manual);
        assert_eq!(live.machine_type, a.machine_type);
    }

    #[test]
    fn interfaces_parse_get_stable_macs_and_become_launcher_args() {
        let mut s = parse_spec_text(
            "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces:\n- {tap: tap0}\n- {tap: tap1, mac: \"52:54:00:AB:CD:EF\"}\n",
        )
        .unwrap();
        assert_eq!(s.interfaces[0].mac, None);
        assert_eq!(
            s.interfaces[1].mac.as_deref(),
            Some("52:54:00:ab:cd:ef"),
            "normalized"
        );
        s.assign_macs(None);
        let mac0 = s.interfaces[0].mac.clone().expect("a MAC was chosen");
        let parsed = contracts::limits::parse_mac(&mac0).unwrap();
        assert_eq!(
            parsed[0] & 0b11,
            0b10,
            "locally administered unicast: {mac0}"
        );
        let args: Vec<String> = s
            .interfaces
            .iter()
            .map(|n| n.launcher_arg().to_arg())
            .collect();
        assert_eq!(
            args,
            [
                format!("tap=tap0,mac={mac0}"),
                "tap=tap1,mac=52:54:00:ab:cd:ef".to_string()
            ]
        );
        // The stored spec round-trips with its MACs; choosing again changes nothing.
        let stored: VmSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        let mut again = stored.clone();
        again.assign_macs(None);
        assert_eq!(again, s);
        // An edit that repeats the interfaces without MACs keeps them (no restart needed).
        let mut edit = parse_spec_text(
            "name: a\nkernel: /k\nmemory: 64Mi\ninterfaces: [{tap: tap0}, {tap: tap1}]",
        )
        .unwrap();
        edit.assign_macs(Some(&s));
        assert_eq!(edit.interfaces, s.interfaces);
        assert!(s.restart_changes(&edit).is_empty());
        // A new TAP is a restart change; a spec without interfaces stays without.
        let mut other = edit.clone();
        other.interfaces[0].tap = "tap9".into();
        assert_eq!(s.restart_changes(&other), ["interfaces"]);
        let plain = parse_spec_text(GOOD).unwrap();
        assert!(plain.interfaces.is_empty());
        // Older stored specs have no `interfaces` field.
        let mut old = serde_json::to_value(&plain).unwrap();
        old.as_object_mut().unwrap().remove("interfaces");
        assert_eq!(serde_json::from_value::<VmSpec>(old).unwrap(), plain);
    }

    #[test]
    fn interface_limits_and_conflicts() {
        let list = |n: usize| {
            (0..n)
                .map(|i| format!("{{tap: t{i}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let spec = |name: &str, ifs: &str| {
            parse_spec_text(&format!(
                "name: {name}\nkernel: /k\nmemory: 64Mi\ninterfaces: [{ifs}]"
            ))
        };
        assert!(spec("a", &list(MAX_INTERFACES)).is_ok());
        let e = spec("a", &list(MAX_INTERFACES + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most"), "{e}");
        assert!(spec("a", "{tap: abcdefghijklmno}").is_ok(), "15 bytes");

        let mut a = spec("a", "{tap: t0}, {tap: t1}").unwrap();
        a.assign_macs(None);
        let b = spec("b", "{tap: t2}, {tap: t1}").unwrap();
        let e = b.interface_conflict([&a]).unwrap().to_string();
        assert!(
            e.contains("interfaces[1].tap: TAP \"t1\" is already used by VM a"),
            "{e}"
        );
        let mac = a.interfaces[0].mac.clone().unwrap();
        let c = spec("c", &format!("{{tap: t3, mac: \"{mac}\"}}")).unwrap();
        let e = c.interface_conflict([&a]).unwrap().to_string();
        assert!(e.contains("is already the MAC of VM a"), "{e}");
        assert!(spec("d", "{tap: t3}")
            .unwrap()
            .interface_conflict([&a])
            .is_none());
        // A VM does not conflict with (a pending spec of) itself.
        assert!(a.interface_conflict([&a]).is_none());
    }

    #[test]
    fn machine_type_resolution() {
        let offered = vec!["q35-1.1".to_string(), "q35-1.0".to_string()];
        assert_eq!(resolve_machine_type("q35", &offered).unwrap(), "q35-1.1");
        assert_eq!(
            resolve_machine_type("q35-1.0", &offered).unwrap(),
            "q35-1.0"
        );
        assert!(resolve_machine_type("pc", &offered).is_err());
    }
}
