//! A throw-away certificate authority and a leaf certificate for
//! `localhost`, written as PEM files.

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

/// A new CA and a leaf for `localhost` signed by it.
pub fn certificates() -> TestCertificates {
    let directory = crate::temp_dir("certs");
    let ca_key = KeyPair::generate().expect("key generation");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("key generation");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf parameters")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    let certificates = TestCertificates {
        ca_file: directory.join("ca.pem"),
        cert_file: directory.join("cert.pem"),
        key_file: directory.join("key.pem"),
        directory,
    };
    std::fs::write(&certificates.ca_file, ca.pem()).expect("write ca.pem");
    std::fs::write(&certificates.cert_file, leaf.pem()).expect("write cert.pem");
    std::fs::write(&certificates.key_file, leaf_key.serialize_pem()).expect("write key.pem");
    certificates
}
