//! `roe tls self-signed`: a certificate pair for a private deployment, made correctly so that
//! every client accepts it: a private CA (`ca.pem`, what clients trust with `--tls-ca`,
//! `curl --cacert`, Python's `ssl.create_default_context(cafile=...)`) and a server
//! certificate it signs (`cert.pem`, `key.pem`: `roe serve --tls-cert/--tls-key`).
//!
//! Why a CA and a certificate it signs rather than one self-signed certificate: that is the
//! shape every verifier expects. `openssl req -x509` makes one certificate marked `CA:TRUE`,
//! which WebPKI verifiers (rustls, so other Rust clients) refuse as a server's own even when
//! trusted (roe's client pins it instead, see `roe_services::tls`); a `CA:FALSE` server
//! certificate for the names asked, signed by a CA, passes everywhere, strict checks included.
//! The CA's key is never written: it signs this one certificate and nothing else can be
//! signed with it, so a stolen folder cannot mint certificates for other names.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The longest validity `--days` takes (a hundred years).
const MAX_DAYS: u32 = 36_500;

#[derive(Args)]
pub struct SelfSignedArgs {
    /// A name clients reach the server by (DNS name or IP address); repeat for several.
    #[arg(long = "san", value_name = "NAME", required = true)]
    pub sans: Vec<String>,
    /// Folder to write ca.pem, cert.pem and key.pem into (made if missing; files already
    /// there are never overwritten).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Days both certificates are valid from now.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// What [`self_signed`] wrote.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the CA and the server certificate for `sans`, valid for `days`, into `out_dir`.
pub fn self_signed(sans: &[String], days: u32, out_dir: &Path) -> Result<Written> {
    if sans.is_empty() || sans.iter().any(|s| s.trim().is_empty()) {
        bail!(
            "--san: give each name clients reach the server by (e.g. --san localhost \
             --san 127.0.0.1)"
        );
    }
    if !(1..=MAX_DAYS).contains(&days) {
        bail!("--days {days}: from 1 to {MAX_DAYS}");
    }
    let written = Written {
        ca: out_dir.join("ca.pem"),
        cert: out_dir.join("cert.pem"),
        key: out_dir.join("key.pem"),
    };
    // Checked before anything is made, so that a second run never leaves a mixed set.
    for path in [&written.ca, &written.cert, &written.key] {
        if path.exists() {
            bail!(
                "--out-dir: {} exists; not overwriting it (remove it or choose another folder)",
                path.display()
            );
        }
    }
    let now = time::OffsetDateTime::now_utc();
    // A few minutes back: a client whose clock is a little behind still accepts it.
    let not_before = now.checked_sub(time::Duration::minutes(5)).unwrap_or(now);
    let Some(not_after) = now.checked_add(time::Duration::days(i64::from(days))) else {
        bail!("--days {days}: past the last date a certificate can carry");
    };

    let mut ca = CertificateParams::new(Vec::<String>::new()).context("the CA's parameters")?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "roe private CA");
    // Path length 0: it signs server certificates, never another CA.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().context("generating the CA's key")?;
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("--san {sans:?}: not a DNS name or IP address"))?;
    server.distinguished_name = DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, sans[0].as_str());
    server.is_ca = IsCa::ExplicitNoCa;
    // An ECDSA key signs the handshake; it never enciphers a key (that is RSA's key transport).
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // Strict verifiers (OpenSSL's X509_STRICT) want the issuer's key named.
    server.use_authority_key_identifier_extension = true;
    server.not_before = not_before;
    server.not_after = not_after;
    let key = KeyPair::generate().context("generating the server's key")?;
    let cert = server
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("--out-dir: creating {}", out_dir.display()))?;
    write_new(&written.ca, ca_cert.pem().as_bytes(), false)?;
    write_new(&written.cert, cert.pem().as_bytes(), false)?;
    write_new(&written.key, key.serialize_pem().as_bytes(), true)?;
    Ok(written)
}

/// Writes a file that must not exist yet; a private one readable by its owner only.
fn write_new(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .with_context(|| format!("--out-dir: creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("--out-dir: writing {}", path.display()))?;
    Ok(())
}

/// `roe tls self-signed`: writes the files and says how to use them.
pub fn cmd_self_signed(a: &SelfSignedArgs) -> Result<()> {
    let w = self_signed(&a.sans, a.days, &a.out_dir)?;
    println!(
        "wrote {} (the CA: give it to clients), {} and {} (the server's), valid {} days for {}",
        w.ca.display(),
        w.cert.display(),
        w.key.display(),
        a.days,
        a.sans.join(", ")
    );
    println!(
        "  roe serve --tls-cert {} --tls-key {} ...",
        w.cert.display(),
        w.key.display()
    );
    println!(
        "  roe --server https://{}:50051 --tls-ca {} expert ls",
        a.sans[0],
        w.ca.display()
    );
    println!(
        "  curl --cacert {} https://{}:8080/v1/models",
        w.ca.display(),
        a.sans[0]
    );
    Ok(())
}
