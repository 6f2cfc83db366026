//! A throw-away certificate authority and a leaf certificate for
//! `localhost`, in memory and written as PEM files.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// PEM files: the CA a client trusts, and the server's leaf and key.
pub struct TestCertificates {
    pub directory: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCertificates {
    /// The CA certificate's PEM text.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_file).expect("the CA file was written")
    }
}

/// A CA and a `localhost` leaf it signed, in memory.
pub struct CertificateSet {
    /// The CA certificate (PEM), for clients to trust.
    pub ca_pem: String,
    /// The leaf followed by the CA (DER), for a server.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
    /// The leaf certificate (PEM).
    pub leaf_pem: String,
    /// The leaf's private key (PEM).
    pub key_pem: String,
}

/// A new CA and a leaf for `localhost` signed by it, in memory.
pub fn generate() -> CertificateSet {
    let ca_key = KeyPair::generate().expect("key generation");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("key generation");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf parameters")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    CertificateSet {
        ca_pem: ca.pem(),
        chain_der: vec![leaf.der().to_vec(), ca.der().to_vec()],
        key_der: leaf_key.serialize_der(),
        leaf_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

/// A new CA and a leaf for `localhost` signed by it, written as PEM files.
pub fn certificates() -> TestCertificates {
    write(&generate())
}

/// Writes a certificate set as PEM files in a fresh directory.
pub fn write(set: &CertificateSet) -> TestCertificates {
    let directory = crate::temp_dir("certs");
    let certificates = TestCertificates {
        ca_file: directory.join("ca.pem"),
        cert_file: directory.join("cert.pem"),
        key_file: directory.join("key.pem"),
        directory,
    };
    std::fs::write(&certificates.ca_file, &set.ca_pem).expect("write ca.pem");
    std::fs::write(&certificates.cert_file, &set.leaf_pem).expect("write cert.pem");
    std::fs::write(&certificates.key_file, &set.key_pem).expect("write key.pem");
    certificates
}
