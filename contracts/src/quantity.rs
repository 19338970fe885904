//! The one size grammar of the project: Kubernetes quantities, as `kubectl` and
//! KubeVirt specs write them. Used by `launcher run --memory`, `launcher migrate
//! --max-bandwidth`, noded's VM specs (`memory`) and settings (`bandwidthPerMigration`),
//! so that `128M` means the same thing everywhere.
//!
//! - binary suffixes `Ki Mi Gi Ti Pi Ei` (powers of 1024);
//! - decimal suffixes `k M G T P E` (powers of 1000; lower-case `k`, as Kubernetes);
//! - no suffix: bytes.
//!
//! Only whole numbers of bytes are accepted: fractions (`1.5Gi`), exponents (`1e9`) and
//! milli-units (`500m`) make no sense for a byte count and are refused with a reason,
//! as are the SI-looking spellings `MB`, `MiB` or `K` that people might mean
//! differently.

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Nothing given.
    #[error("empty quantity (use e.g. 128Mi, 1Gi, 500M)")]
    Empty,
    /// No leading digits.
    #[error("{0:?} is not a quantity: it must start with a whole number (e.g. 128Mi, 1Gi, 500M)")]
    NoNumber(String),
    /// A fraction or an exponent.
    #[error("{0:?} is not a quantity: only whole numbers of bytes are accepted (write 1536Mi, not 1.5Gi)")]
    Fraction(String),
    /// An unknown suffix; `hint` suggests the likely meaning.
    #[error("{input:?} is not a quantity: unknown suffix {suffix:?}{hint}; use Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000)")]
    Suffix {
        /// The input.
        input: String,
        /// The suffix found.
        suffix: String,
        /// A suggestion (`" (did you mean Mi?)"`) or empty.
        hint: String,
    },
    /// The value does not fit in 64 bits.
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// The multiplier of a suffix.
fn multiplier(suffix: &str) -> Option<u64> {
    Some(match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "P" => 1000u64.pow(5),
        "E" => 1000u64.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    })
}

/// What someone writing an unknown suffix most likely meant.
fn hint(suffix: &str) -> String {
    let likely = match suffix {
        "K" => "k (1000) or Ki (1024)",
        "KB" | "kB" | "KiB" | "kiB" => "Ki",
        "MB" | "MiB" | "m" | "mi" => "Mi (1048576) or M (1000000)",
        "GB" | "GiB" | "g" | "gi" => "Gi or G",
        "TB" | "TiB" => "Ti or T",
        "B" | "b" => "no suffix (bytes)",
        _ => return String::new(),
    };
    format!(" (did you mean {likely}?)")
}

/// Parses a Kubernetes quantity into bytes.
pub fn parse(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(QuantityError::NoNumber(input.to_string()));
    }
    if suffix.starts_with(['.', 'e', 'E']) && suffix.len() > 1 && multiplier(suffix).is_none() {
        return Err(QuantityError::Fraction(input.to_string()));
    }
    let mult = multiplier(suffix).ok_or_else(|| QuantityError::Suffix {
        input: input.to_string(),
        suffix: suffix.to_string(),
        hint: hint(suffix),
    })?;
    let n: u64 = num
        .parse()
        .map_err(|_| QuantityError::Overflow(input.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| QuantityError::Overflow(input.to_string()))
}

/// Formats bytes as the shortest exact binary quantity (`134217728` → `128Mi`), for
/// people; exact so that it parses back to the same number.
pub fn format_binary(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suffix() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("1k", 1000),
            ("1M", 1_000_000),
            ("1G", 1_000_000_000),
            ("1T", 1_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000),
            ("1Ki", 1024),
            ("128Mi", 128 << 20),
            ("2Gi", 2 << 30),
            ("1Ti", 1 << 40),
            ("1Pi", 1 << 50),
            ("1Ei", 1 << 60),
            (" 16Mi ", 16 << 20),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s), Ok(*want), "{s}");
        }
    }

    #[test]
    fn errors_say_what_to_write() {
        let msg = |s: &str| parse(s).unwrap_err().to_string();
        assert_eq!(msg(""), "empty quantity (use e.g. 128Mi, 1Gi, 500M)");
        assert!(msg("Mi").contains("must start with a whole number"));
        assert!(msg("1.5Gi").contains("write 1536Mi, not 1.5Gi"));
        assert!(msg("1e9").contains("only whole numbers"));
        let m = msg("128MB");
        assert!(m.contains("unknown suffix \"MB\""), "{m}");
        assert!(
            m.contains("did you mean Mi (1048576) or M (1000000)?"),
            "{m}"
        );
        assert!(m.contains("use Ki, Mi, Gi, Ti"), "{m}");
        assert!(msg("1K").contains("did you mean k (1000) or Ki (1024)?"));
        assert!(msg("64Q").contains("unknown suffix \"Q\"; use Ki"));
        assert!(msg("16Ei").contains("too large"));
        assert!(msg("99999999999999999999999").contains("too large"));
        assert!(msg("-1").contains("must start with a whole number"));
    }

    #[test]
    fn binary_format_round_trips() {
        for n in [0, 1, 1000, 1024, 128 << 20, 3 << 30, (1 << 30) + 4096] {
            assert_eq!(parse(&format_binary(n)), Ok(n));
        }
        assert_eq!(format_binary(128 << 20), "128Mi");
        assert_eq!(format_binary(1536 << 20), "1536Mi");
        assert_eq!(format_binary(1000), "1000");
    }
}
