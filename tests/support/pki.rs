//! Certificates made at test time: a private CA that signs leaf certificates, every PEM written
//! to a directory of its own under the system temp dir (removed when the CA is dropped). No key
//! material is committed; nothing here touches the network.
//!
//! ```ignore
//! let ca = Ca::new("Test CA");
//! let site = ca.leaf(&["www.site.test"]);
//! // site.cert_path / site.key_path for the proxy's configuration,
//! // ca.roots() or ca.path for whoever must trust it.
//! ```
//!
//! Also used by `benches/transport.rs` (through `#[path]`), so it depends on nothing else in
//! the harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A directory that is removed, with everything in it, when the last owner drops it.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory whose name no other test (or test process) uses.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "kmi-{label}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create the temp dir {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes a file in this directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate.
    pub der: CertificateDer<'static>,
    /// `ca.pem`: the CA certificate, for `upstream_ca`.
    pub path: PathBuf,
    dir: Arc<TempDir>,
}

/// A leaf certificate signed by a [`Ca`], with its key, as files and as DER.
#[derive(Clone)]
pub struct Leaf {
    pub names: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
    dir: Arc<TempDir>,
}

impl Ca {
    /// A new CA whose subject's common name is `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate the CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let dir = Arc::new(TempDir::new("pki"));
        let path = dir.write("ca.pem", cert.pem());
        Ca {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
            path,
            dir,
        }
    }

    /// A leaf certificate for these DNS names or IP addresses, signed by this CA, written as
    /// `<first name>.crt` and `<first name>.key` (the key in PKCS#8) beside the CA's file.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("generate a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf parameters");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("leaf", |n| n.as_str()),
        );
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the leaf certificate");
        let stem = names
            .first()
            .map_or_else(|| "leaf".to_owned(), |n| n.replace(['*', ':'], "_"));
        Leaf {
            cert_path: self.dir.write(&format!("{stem}.crt"), cert.pem()),
            key_path: self.dir.write(&format!("{stem}.key"), key.serialize_pem()),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
            names,
            dir: Arc::clone(&self.dir),
        }
    }

    /// A trust store holding only this CA.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.der.clone())
            .expect("a usable CA certificate");
        roots
    }

    /// The directory this CA writes its files to, for tests that need other files beside them.
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }
}

impl Leaf {
    /// The private key, for a TLS server in the test itself.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The certificate chain a server presents (the leaf alone: the CA is the trust anchor).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }
}

/// The ring provider, the only one this project builds with.
pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration for a test server: this certificate, ALPN as given (in order of
/// preference).
pub fn server_config(leaf: &Leaf, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain(), leaf.key())
        .expect("the leaf's key fits its certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS client configuration trusting only `roots`, offering ALPN as given.
pub fn client_config(roots: RootCertStore, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}
