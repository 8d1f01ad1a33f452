//! Test certificates, made at test time: a CA, and leaves it signs for the
//! scaler (`localhost`, 127.0.0.1) and for clients (a DNS name each). No
//! key is ever committed. Shared by the scaler's and the workspace's TLS
//! tests (`#[path]`).

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and a directory of PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, "gpuscale test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    /// The CA's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Writes a leaf for `names` to `cert` and `key`; returns the
    /// certificate's DER.
    pub fn write_leaf(&self, cert: &Path, key: &Path, names: &[&str], server: bool) -> Vec<u8> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &self.ca).unwrap();
        // Written whole, then renamed: a reader never sees half a file.
        let tmp = cert.with_extension("tmp");
        std::fs::write(&tmp, leaf.pem()).unwrap();
        std::fs::rename(&tmp, cert).unwrap();
        std::fs::write(&tmp, leaf_key.serialize_pem()).unwrap();
        std::fs::rename(&tmp, key).unwrap();
        leaf.der().to_vec()
    }

    /// A server leaf for `localhost` and 127.0.0.1 as `server.crt`/`server.key`.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        );
        self.write_leaf(&cert, &key, &["localhost", "127.0.0.1"], true);
        (cert, key)
    }

    /// A client leaf whose DNS name is `name`, as `<name>.crt`/`<name>.key`.
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        self.write_leaf(&cert, &key, &[name], false);
        (cert, key)
    }
}
