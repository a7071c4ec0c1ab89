//! Certificates and who a peer is.
//!
//! One CA signs every identity. An identity is a DNS name in the
//! certificate's subject alternative names: `node-<id>.flashstock` for a
//! member (also the name clients verify when they connect to it),
//! `checkout.clients.flashstock` for checkout services and
//! `admin.clients.flashstock` for operators. Member certificates also name
//! `member.flashstock`, which clients verify (they reach a seed before they
//! know its id; the welcome tells it). Both ends of every connection
//! present a certificate (mutual TLS); a chain that does not lead to the CA
//! is refused during the handshake, and a valid certificate that names none
//! of these identities is refused right after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, ServerName};

pub use flashstock_client::tls::{client_crypto, load_roots, node_name, provider, Identity, ALPN};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node(u32),
    Checkout,
    Admin,
}

pub const CHECKOUT_NAME: &str = "checkout.clients.flashstock";
pub const ADMIN_NAME: &str = "admin.clients.flashstock";

/// File names of an identity's certificate and key in the TLS directory.
pub fn identity_files(directory: &Path, identity: &str) -> (PathBuf, PathBuf) {
    (directory.join(format!("{identity}.pem")), directory.join(format!("{identity}.key")))
}

/// Version of the development set's layout (names in the certificates).
const DEVELOPMENT_LAYOUT: &str = "2";

/// Creates a development CA and certificates for `members`, `checkout` and
/// `admin` in `directory`, unless every file is already there. Returns
/// whether it wrote anything. The CA's key is not kept: adding a member
/// means creating the set again.
pub fn create_development_certificates(directory: &Path, members: &[u32]) -> anyhow::Result<bool> {
    let mut identities: Vec<(String, Vec<String>)> = members
        .iter()
        .map(|id| (format!("node-{id}"), vec![node_name(*id), flashstock_client::tls::MEMBER_NAME.to_owned()]))
        .collect();
    identities.push(("checkout".to_owned(), vec![CHECKOUT_NAME.to_owned()]));
    identities.push(("admin".to_owned(), vec![ADMIN_NAME.to_owned()]));
    // The layout's version: a set written by an older layout (other names
    // in the certificates) is replaced.
    let layout = directory.join("LAYOUT");
    let complete = std::fs::read_to_string(&layout).is_ok_and(|text| text.trim() == DEVELOPMENT_LAYOUT)
        && directory.join("ca.pem").exists()
        && identities.iter().all(|(file, _)| {
            let (certificate, key) = identity_files(directory, file);
            certificate.exists() && key.exists()
        });
    if complete {
        return Ok(false);
    }
    std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "flashstock development CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_certificate = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    write_file(&directory.join("ca.pem"), &ca_certificate.pem(), false)?;
    for (file, names) in identities {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.clone())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0].clone());
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, &issuer)?;
        let (certificate_path, key_path) = identity_files(directory, &file);
        write_file(&certificate_path, &certificate.pem(), false)?;
        write_file(&key_path, &key.serialize_pem(), true)?;
    }
    write_file(&layout, DEVELOPMENT_LAYOUT, false)?;
    Ok(true)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

/// The node's side: presents `identity`, requires a client certificate
/// from the CA.
pub fn server_crypto(roots: Arc<rustls::RootCertStore>, identity: Identity) -> anyhow::Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .context("the node's certificate and key")?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Which role a verified peer certificate names; `None` if it names none
/// (or more than one). `members` are the ids a node role may have.
pub fn role_of(certificate: &CertificateDer<'_>, members: &[u32]) -> Option<Role> {
    let certificate = webpki::EndEntityCert::try_from(certificate).ok()?;
    let names = |name: &str| {
        ServerName::try_from(name).is_ok_and(|name| certificate.verify_is_valid_for_subject_name(&name).is_ok())
    };
    let mut roles = members
        .iter()
        .filter(|id| names(&node_name(**id)))
        .map(|id| Role::Node(*id))
        .chain(names(CHECKOUT_NAME).then_some(Role::Checkout))
        .chain(names(ADMIN_NAME).then_some(Role::Admin));
    let role = roles.next()?;
    roles.next().is_none().then_some(role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_certificates_name_their_roles() {
        let directory = std::env::temp_dir().join(format!("flashstock-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        assert!(create_development_certificates(&directory, &[1, 2]).expect("created"));
        assert!(!create_development_certificates(&directory, &[1, 2]).expect("kept"), "an existing set is kept");
        let role = |identity: &str| {
            let loaded = Identity::load(&directory, identity).expect("loads");
            role_of(&loaded.chain[0], &[1, 2])
        };
        assert_eq!(role("node-2"), Some(Role::Node(2)));
        assert_eq!(role("checkout"), Some(Role::Checkout));
        assert_eq!(role("admin"), Some(Role::Admin));
        let node_one = Identity::load(&directory, "node-1").expect("loads");
        assert_eq!(role_of(&node_one.chain[0], &[2]), None, "a node that is not a member is nobody");
        let roots = load_roots(&directory).expect("roots");
        server_crypto(roots.clone(), Identity::load(&directory, "node-1").expect("loads")).expect("server config");
        client_crypto(roots, Identity::load(&directory, "checkout").expect("loads")).expect("client config");
        std::fs::remove_dir_all(&directory).expect("cleanup");
    }
}
