//! A certificate authority for the TLS tests: writes the `ca.pem`, `cert.pem`, `key.pem`
//! directories that `--tls-dir` takes.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A test CA.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("self-sign CA");
        Ca { cert, key }
    }

    /// The CA certificate in PEM, for a `ca.pem` that trusts this CA.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Fill `dir` for a host called `names` (DNS names or IPs; the first is also the
    /// common name): this CA's certificate, and a certificate and key it issued, good
    /// for both ends of a migration. Returns `dir` as a string for command lines.
    pub fn tls_dir(&self, dir: &Path, names: &[&str]) -> String {
        std::fs::create_dir_all(dir).expect("tls dir");
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        std::fs::write(dir.join("ca.pem"), self.cert.pem()).expect("ca.pem");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert.pem");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key.pem");
        dir.display().to_string()
    }
}
