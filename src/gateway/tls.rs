//! HTTPS for the gateway (`[gateway] tls_cert`/`tls_key`): rustls with the
//! same `ring` provider as the rest of the process, HTTP/1.1 only.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// The server's TLS configuration from the PEM files; a file that is
/// missing, empty or not PEM fails the start with its key.
pub fn server_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| ConfigError::new("gateway.tls_cert", format!("{cert}: {e}")))?;
    if chain.is_empty() {
        return Err(ConfigError::new(
            "gateway.tls_cert",
            format!("{cert} holds no certificate"),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ConfigError::new("gateway.tls_key", format!("{key}: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ConfigError::new("gateway.tls_cert", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| {
        ConfigError::new(
            "gateway.tls_key",
            format!("does not match {cert} or is not usable: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
