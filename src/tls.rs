//! TLS with rustls: certificates and keys loaded from PEM files for the TLS listener (with SNI
//! selection), and the client configuration for `https://` origins. The only module that names
//! rustls; one crypto provider (ring) for the whole binary.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The one crypto provider. Installing it explicitly (rather than letting rustls pick from the
/// crate features it was built with) means a second provider appearing in the dependency tree
/// cannot make the process panic at the first handshake.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return Arc::clone(p);
    }
    // Losing the race to another thread installing the same provider is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::clone(CryptoProvider::get_default().expect("a provider was just installed"))
}

/// A certificate chain and key that belong together, from one pair of PEM files.
#[derive(Clone)]
pub struct LoadedCert {
    pub cert_path: PathBuf,
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoadedCert({})", self.cert_path.display())
    }
}

/// Loads a PEM certificate chain and its private key (PKCS#8, PKCS#1 RSA or SEC1 EC). The error
/// names the file and what is wrong with it.
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| {
            format!(
                "{}: cannot read certificates: {}",
                cert_path.display(),
                pem_error(&e)
            )
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {}", cert_path.display(), pem_error(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE section found",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        format!(
            "{}: cannot read a private key: {}",
            key_path.display(),
            pem_error(&e)
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        format!(
            "{} and {}: the key does not fit the certificate ({e})",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(LoadedCert {
        cert_path: cert_path.to_owned(),
        key: Arc::new(certified),
    })
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM section of the expected type".into(),
        other => other.to_string(),
    }
}

/// Loads every PEM certificate in a file as a trust anchor (`upstream_ca`).
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        format!(
            "{}: cannot read certificates: {}",
            path.display(),
            pem_error(&e)
        )
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {}", path.display(), pem_error(&e)))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CERTIFICATE section found", path.display()));
    }
    Ok(roots)
}

/// Picks the certificate for a handshake by the client's SNI name: an exact host first, then a
/// `*.` wildcard one label up, else the default certificate.
#[derive(Debug)]
struct SniResolver {
    default: Option<LoadedCert>,
    exact: HashMap<String, LoadedCert>,
    wildcard: HashMap<String, LoadedCert>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello.server_name().and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                let parent = name.split_once('.')?.1;
                self.wildcard.get(parent)
            })
        });
        by_name
            .or(self.default.as_ref())
            .map(|c| Arc::clone(&c.key))
    }
}

/// The TLS listener's configuration: certificates by SNI, ALPN `h2` then `http/1.1`.
pub fn server_config(
    default: Option<LoadedCert>,
    by_host: Vec<(String, LoadedCert)>,
) -> Arc<ServerConfig> {
    let mut resolver = SniResolver {
        default,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for (host, cert) in by_host {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.strip_prefix("*.") {
            Some(parent) => resolver.wildcard.insert(parent.to_owned(), cert),
            None => resolver.exact.insert(host, cert),
        };
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The client configuration for `https://` origins: the bundled webpki roots, plus the operator's
/// private CA when given. ALPN is set by the connector (h2, then http/1.1).
pub fn client_config(upstream_ca: Option<&rustls::RootCertStore>) -> ClientConfig {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(extra) = upstream_ca {
        roots.roots.extend(extra.roots.iter().cloned());
    }
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Whether an error (from anywhere in a source chain) is a TLS failure, such as a certificate
/// that does not verify.
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    // hyper-rustls wraps rustls's `io::Error` in another one, whose `source()` skips the
    // rustls error: look inside each wrapper instead.
    let mut wrapped = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref());
    while let Some(inner) = wrapped {
        if inner.is::<rustls::Error>() {
            return true;
        }
        wrapped = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
    }
    false
}
