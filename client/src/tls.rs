//! TLS material of a client (or of a node dialling its peers): the
//! cluster CA to verify nodes with, and the caller's own certificate and
//! key, which the node maps to a role (`checkout`, `admin`, `node-<id>`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol both ends must offer.
pub const ALPN: &[u8] = b"flashstock/1";

/// The name a member's certificate carries, which members verify when
/// they dial each other.
pub fn node_name(id: u32) -> String {
    format!("node-{id}.flashstock")
}

/// The name every member's certificate also carries: what clients verify,
/// since they reach a seed before they know its id.
pub const MEMBER_NAME: &str = "member.flashstock";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Material { what: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn material(what: impl Into<String>, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Material { what: what.into(), reason: reason.to_string() }
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// From PEM text: the certificate (chain) and the private key.
    pub fn from_pem(certificate: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let chain = certificates_from_pem(certificate, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|error| material("private key", error))?;
        Ok(Self { chain, key })
    }

    /// `<identity>.pem` and `<identity>.key` in `directory`.
    pub fn load(directory: &Path, identity: &str) -> Result<Self, TlsError> {
        let read = |name: String| {
            let path = directory.join(&name);
            std::fs::read(&path).map_err(|error| material(path.display().to_string(), error))
        };
        Self::from_pem(&read(format!("{identity}.pem"))?, &read(format!("{identity}.key"))?)
    }
}

fn certificates_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|error| material(what, error))?;
    if chain.is_empty() {
        return Err(material(what, "no certificate in the PEM text"));
    }
    Ok(chain)
}

/// The CA certificates in `pem`, as roots of trust.
pub fn roots_from_pem(pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates_from_pem(pem, "CA certificate")? {
        roots.add(certificate)?;
    }
    Ok(Arc::new(roots))
}

/// The CA of `directory` (`ca.pem`).
pub fn load_roots(directory: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let path = directory.join("ca.pem");
    let pem = std::fs::read(&path).map_err(|error| material(path.display().to_string(), error))?;
    roots_from_pem(&pem)
}

/// The crypto provider: ring, chosen at build time (no process default is
/// installed, so linking this crate changes nothing else in a program).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The connecting side: TLS 1.3 only (QUIC needs it), nodes verified
/// against `roots`, `identity` presented.
pub fn client_crypto(roots: Arc<rustls::RootCertStore>, identity: Identity) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
