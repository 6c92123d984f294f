//! The NATS client: server list, credentials, TLS, and reconnecting forever.

use std::time::Duration;

use anyhow::Context as _;

use crate::config::CommonConfig;

/// Connects to NATS; the client reconnects by itself, forever.
pub async fn connect(config: &CommonConfig) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new();
    // `nats://user:password@host`: the client parses it but does not send it by itself.
    let from_url = config.nats_url.split(',').find_map(|url| {
        let addr: async_nats::ServerAddr = url.trim().parse().ok()?;
        Some((addr.username()?.to_owned(), addr.password()?.to_owned()))
    });
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
        .connect(config.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats_url))
}
