//! The NATS client: server list, credentials, TLS, and reconnecting forever.

use std::time::Duration;

use anyhow::Context as _;

use crate::config::{redact_url, CommonConfig};

/// The servers of `FL_NATS_URL`: one URL, or several separated by commas (the nodes of a
/// cluster; the client picks one and moves to another when it is lost).
pub fn servers(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>().map_err(|e| {
                anyhow::anyhow!(
                    "FL_NATS_URL: {} is not a NATS server address: {e}",
                    redact_url(url)
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "FL_NATS_URL names no NATS server");
    Ok(servers)
}

/// Connects to NATS; the client reconnects by itself, forever.
pub async fn connect(config: &CommonConfig) -> anyhow::Result<async_nats::Client> {
    let servers = servers(&config.nats_url)?;
    let mut options = async_nats::ConnectOptions::new();
    // `nats://user:password@host`: the client parses it but does not send it by itself.
    let from_url = servers
        .iter()
        .find_map(|addr| Some((addr.username()?.to_owned(), addr.password()?.to_owned())));
    let login = match (&config.nats_user, &config.nats_password) {
        (Some(user), Some(password)) => Some((user.clone(), password.clone())),
        _ => from_url,
    };
    if let Some((user, password)) = login {
        options = options.user_and_password(user, password);
    }
    if let Some(seed) = &config.nats_nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let Some(ca) = &config.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if config.nats_tls_required {
        options = options.require_tls(true);
    }
    options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {}", redact_url(&config.nats_url)))
}

#[cfg(test)]
mod tests {
    use super::servers;

    #[test]
    fn a_comma_separated_list_names_every_node() {
        let list =
            servers("nats://127.0.0.1:4222, nats://u:p@127.0.0.2:4223,nats://127.0.0.3:4224")
                .expect("a list of three");
        let ports: Vec<u16> = list.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert_eq!(list[1].username(), Some("u"));
        assert_eq!(servers("nats://127.0.0.1:4222").unwrap().len(), 1);
    }

    #[test]
    fn a_bad_address_is_named_without_its_password() {
        let e = servers("nats://127.0.0.1:4222,nats://u:secret@host:notaport")
            .unwrap_err()
            .to_string();
        assert!(e.contains("u:***@host:notaport"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(servers(" , ").is_err());
    }
}
