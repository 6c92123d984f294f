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
    let login = Login {
        url: &config.nats_url,
        user: config.nats_user.as_deref(),
        password: config.nats_password.as_deref(),
        nkey_seed: config.nats_nkey_seed.as_deref(),
        creds: config.nats_creds.as_deref(),
        tls_ca: config.nats_tls_ca.as_deref(),
        tls_required: config.nats_tls_required,
    };
    connect_as(&login, async_nats::ConnectOptions::new()).await
}

/// How a process logs in to NATS: the workers' settings (`FL_NATS_*`), or a gateway's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Login<'a> {
    /// One URL or a comma-separated list (`FL_NATS_URL`).
    pub url: &'a str,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    pub nkey_seed: Option<&'a str>,
    pub creds: Option<&'a std::path::Path>,
    pub tls_ca: Option<&'a std::path::Path>,
    pub tls_required: bool,
}

/// Connects with `login` on top of `options` (a gateway's inbox prefix, say); the client
/// reconnects by itself, forever.
pub async fn connect_as(
    login: &Login<'_>,
    mut options: async_nats::ConnectOptions,
) -> anyhow::Result<async_nats::Client> {
    let servers = servers(login.url)?;
    // `nats://user:password@host`: the client parses it but does not send it by itself.
    let from_url = servers
        .iter()
        .find_map(|addr| Some((addr.username()?.to_owned(), addr.password()?.to_owned())));
    let given = match (login.user, login.password) {
        (Some(user), Some(password)) => Some((user.to_owned(), password.to_owned())),
        _ => from_url,
    };
    if let Some((user, password)) = given {
        options = options.user_and_password(user, password);
    }
    if let Some(seed) = login.nkey_seed {
        options = options.nkey(seed.to_owned());
    }
    if let Some(path) = login.creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let Some(ca) = login.tls_ca {
        options = options
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true);
    }
    if login.tls_required {
        options = options.require_tls(true);
    }
    options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {}", redact_url(login.url)))
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
