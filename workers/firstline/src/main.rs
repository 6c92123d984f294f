//! `firstline`: every worker in one process, migrations, configuration and the demo.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use firstline::{dead_letters, demo, load, nats_config, setup};
use firstline_shared::config::CommonConfig;

#[derive(Debug, Parser)]
#[command(name = "firstline", about = "FIRST LINE routing", version)]
struct Cli {
    #[command(flatten)]
    common: CommonConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run ingest, bot-router, dispatcher, notifier and the API in this process.
    Run {
        #[command(flatten)]
        api: ApiOptions,
    },
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Create or update tenants, channels and agents from a JSON file.
    Configure {
        #[arg(long)]
        file: PathBuf,
    },
    /// Run every worker and the demo tenant (with simulated customers and agents unless
    /// --no-simulation), printing state changes.
    Demo {
        /// Stop after this many conversations are completed (default: run until Ctrl-C).
        #[arg(long)]
        conversations: Option<usize>,
        /// Seconds between new customers.
        #[arg(long, default_value_t = 2.0)]
        every: f64,
        /// No simulated customers and agents: only the web chat (yours) and Dana's desk.
        #[arg(long)]
        no_simulation: bool,
        #[command(flatten)]
        api: ApiOptions,
    },
    /// API tokens: `token create --tenant acme --role admin` prints a new token (shown once).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Generate load: simulated gateways and agents over many tenants, channels and
    /// customers, with progress lines and a latency report (see README, Load generator).
    Load(LoadArgs),
    /// The bot's configuration: keyword rules, articles, flows, business hours, survey.
    Bot {
        #[command(subcommand)]
        action: BotAction,
    },
    /// List dead letters (messages that could never be handled), oldest first.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Print a NATS server configuration that fences each tenant's gateway to its subjects.
    NatsConfig {
        /// A gateway user per tenant: TENANT:PASSWORD.
        #[arg(long = "gateway", value_name = "TENANT:PASSWORD")]
        gateways: Vec<String>,
        #[arg(long, default_value = "firstline")]
        workers_user: String,
        #[arg(long, env = "FL_NATS_WORKERS_PASSWORD", default_value = "firstline")]
        workers_password: String,
        #[arg(long, default_value = "/data")]
        store_dir: String,
    },
    /// Write the JSON Schema of every wire message into DIR.
    Schemas {
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
}

/// Where the all-in-one process serves the HTTP API and dashboard.
#[derive(Debug, clap::Args)]
struct ApiOptions {
    /// Address of the HTTP API, the dashboard and agents' WebSockets.
    #[arg(long, env = "FL_API_ADDR", default_value = "127.0.0.1:8080")]
    api_addr: std::net::SocketAddr,
    /// Do not serve the API in this process (run `firstline-api` apart).
    #[arg(long)]
    no_api: bool,
}

impl ApiOptions {
    fn addr(&self) -> Option<std::net::SocketAddr> {
        (!self.no_api).then_some(self.api_addr)
    }
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Make a token and print it (only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        /// admin, supervisor or agent.
        #[arg(long)]
        role: String,
        /// The agent an agent token acts as.
        #[arg(long)]
        agent: Option<String>,
        /// What the token is for.
        #[arg(long, default_value = "")]
        name: String,
    },
}

async fn token(common: &CommonConfig, action: TokenAction) -> anyhow::Result<()> {
    let TokenAction::Create {
        tenant,
        role,
        agent,
        name,
    } = action;
    let tenant = firstline_shared::domain::TenantId::parse(tenant)?;
    let role = firstline_api::auth::Role::parse(&role)
        .with_context(|| format!("role {role:?}: use admin, supervisor or agent"))?;
    let agent = agent
        .map(firstline_shared::domain::AgentId::parse)
        .transpose()?;
    firstline_shared::db::migrate(&common.database_url).await?;
    let (client, connection) =
        tokio_postgres::connect(&common.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let (_, token) =
        firstline_api::auth::create_token(&client, &tenant, role, agent.as_ref(), &name)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    println!("{token}");
    Ok(())
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Inbound messages per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    #[arg(long, default_value_t = 3)]
    tenants: usize,
    /// Channels with a bot per tenant (and as many without).
    #[arg(long, default_value_t = 2)]
    channels: usize,
    /// A preset mix (cold, steady, one-channel: load/mix.rs): sets the tenants, channels,
    /// customers and shares, over the options below.
    #[arg(long, value_enum)]
    mix: Option<load::Mix>,
    /// Returning customers who talk to the bot.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Share of messages that are questions to the bot.
    #[arg(long, default_value_t = 0.8)]
    bot_share: f64,
    /// Share of messages that ask for a human; the rest are new customers on channels without bot.
    #[arg(long, default_value_t = 0.1)]
    handover_share: f64,
    /// Simulated agents per tenant.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    #[arg(long, default_value_t = 10)]
    capacity: i32,
    #[arg(long, default_value_t = 500)]
    accept_delay_ms: u64,
    /// An agent closes a conversation this long after accepting it.
    #[arg(long, default_value_t = 1000)]
    close_after_ms: u64,
    /// Bytes of text per customer message.
    #[arg(long, default_value_t = 120)]
    text_bytes: usize,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5.0)]
    progress: f64,
    /// Seconds to wait after the last send for what is still owed.
    #[arg(long, default_value_t = 15.0)]
    drain: f64,
    /// Tenant id prefix.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Publish on `fl.<t>.inbound.<channel>` (ordered per channel, the slower form) instead of
    /// with the customer key (`fl.<t>.inbound.<channel>.<customer key>`).
    #[arg(long)]
    per_channel: bool,
    /// First write this many completed conversations per tenant (a desk's past: realistic
    /// table sizes and query plans; README, Load generator).
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Also run every worker in this process (otherwise they must be running).
    #[arg(long)]
    with_workers: bool,
}

#[derive(Debug, Subcommand)]
enum BotAction {
    /// Load a tenant's bot configuration from a YAML or JSON file (checked first; all or nothing).
    Load {
        #[arg(long)]
        file: PathBuf,
    },
    /// Check a file without writing anything.
    Check {
        #[arg(long)]
        file: PathBuf,
    },
    /// Check a flow's draft and publish it as the next version.
    Publish {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        flow: String,
    },
}

async fn bot(common: &CommonConfig, action: BotAction) -> anyhow::Result<()> {
    use firstline_bot_router::setup::{self as bot_setup, BotFile};
    match action {
        BotAction::Check { file } => {
            BotFile::read(&file)?;
            println!("{}: ok", file.display());
        }
        BotAction::Load { file } => {
            let parsed = BotFile::read(&file)?;
            let applied = bot_setup::load(&common.database_url, &parsed).await?;
            println!(
                "loaded {} for tenant {}: {applied:?}",
                file.display(),
                parsed.tenant
            );
        }
        BotAction::Publish { tenant, flow } => {
            let tenant = firstline_shared::domain::TenantId::parse(tenant)?;
            let (mut client, connection) =
                tokio_postgres::connect(&common.database_url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let tx = client.transaction().await?;
            let published = bot_setup::publish(&tx, &tenant, &flow).await?;
            tx.commit().await?;
            match published {
                Some(v) => println!("flow {flow} of tenant {tenant}: published version {v}"),
                None => {
                    println!("flow {flow} of tenant {tenant}: the draft equals the latest version")
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Show dead letters with their sequence, reason and subject.
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Stream of the original message: FL_INBOUND, FL_ACTIONS...
        #[arg(long)]
        stream: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publish dead letters again to their original subject, then remove them.
    Replay {
        /// Sequences to replay (from `list`).
        #[arg(long = "seq", required_unless_present = "all")]
        sequences: Vec<u64>,
        /// Every dead letter matching --tenant and --stream.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        stream: Option<String>,
    },
}

async fn dead_letters(common: &CommonConfig, action: DeadLetterAction) -> anyhow::Result<()> {
    let client = firstline_shared::bus::connect(common).await?;
    let js = async_nats::jetstream::new(client);
    match action {
        DeadLetterAction::List {
            tenant,
            stream,
            limit,
        } => {
            let letters =
                dead_letters::list(&js, &dead_letters::Filter { tenant, stream }, limit).await?;
            for (seq, l) in &letters {
                println!(
                    "{seq:>8}  {}  {:<14} {:<36} deliveries={}  {}",
                    l.at.format("%Y-%m-%d %H:%M:%S"),
                    l.stream,
                    l.subject,
                    l.deliveries,
                    l.reason
                );
                println!(
                    "          payload: {}",
                    l.payload.chars().take(200).collect::<String>()
                );
            }
            println!("{} dead letter(s)", letters.len());
        }
        DeadLetterAction::Replay {
            sequences,
            all,
            tenant,
            stream,
        } => {
            let sequences = if all {
                let filter = dead_letters::Filter { tenant, stream };
                dead_letters::list(&js, &filter, usize::MAX)
                    .await?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            } else {
                sequences
            };
            let n = dead_letters::replay(&js, &sequences).await?;
            println!("replayed {n} dead letter(s)");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    firstline_shared::worker::runtime(cli.common.worker_threads)?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let telemetry = firstline_shared::telemetry::init("firstline")?;
    let shutdown = firstline_shared::shutdown::on_signals();
    if let (Command::Run { .. } | Command::Demo { .. }, Some(addr)) =
        (&cli.command, cli.common.metrics_addr)
    {
        firstline_shared::metrics::serve(addr)?;
    }
    let result = match cli.command {
        Command::Run { api } => {
            firstline_shared::db::create_database_if_missing(&cli.common.database_url).await?;
            firstline::run_all_with_api(cli.common, api.addr(), shutdown).await
        }
        Command::Migrate => {
            firstline_shared::db::create_database_if_missing(&cli.common.database_url).await?;
            firstline_shared::db::migrate(&cli.common.database_url).await
        }
        Command::Configure { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let parsed =
                setup::SetupFile::parse(&text).with_context(|| format!("in {}", file.display()))?;
            setup::configure(&cli.common.database_url, &parsed).await
        }
        Command::Demo {
            conversations,
            every,
            no_simulation,
            api,
        } => {
            firstline_shared::db::create_database_if_missing(&cli.common.database_url).await?;
            firstline_shared::db::migrate(&cli.common.database_url).await?;
            let workers = tokio::spawn(firstline::run_all_with_api(
                cli.common.clone(),
                api.addr(),
                shutdown.clone(),
            ));
            let options = demo::DemoOptions {
                conversations,
                every: Duration::from_secs_f64(every),
                api_addr: api.addr(),
                simulate: !no_simulation,
            };
            let completed = demo::run(
                &cli.common.nats_url,
                &cli.common.database_url,
                options,
                shutdown.clone(),
            )
            .await;
            shutdown.cancel();
            let _ = workers.await;
            completed.map(|n| println!("demo finished: {n} conversations completed"))
        }
        Command::Load(args) => run_load(&cli.common, args, shutdown.clone()).await,
        Command::DeadLetters { action } => dead_letters(&cli.common, action).await,
        Command::Bot { action } => bot(&cli.common, action).await,
        Command::Token { action } => token(&cli.common, action).await,
        Command::NatsConfig {
            gateways,
            workers_user,
            workers_password,
            store_dir,
        } => {
            let gateways = gateways
                .iter()
                .map(|g| {
                    let (tenant, password) = g
                        .split_once(':')
                        .context("--gateway takes TENANT:PASSWORD")?;
                    Ok(nats_config::Gateway {
                        tenant: firstline_shared::domain::TenantId::parse(tenant)?,
                        password: password.to_owned(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            print!(
                "{}",
                nats_config::server_config(&store_dir, &workers_user, &workers_password, &gateways)
            );
            Ok(())
        }
        Command::Schemas { dir } => write_schemas(&dir),
    };
    telemetry.shutdown_async().await;
    result
}

async fn run_load(
    common: &CommonConfig,
    args: LoadArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut options = load::LoadOptions {
        rate: args.rate,
        duration: Duration::from_secs_f64(args.duration),
        tenants: args.tenants.max(1),
        channels: args.channels.max(1),
        customers: args.customers.max(1),
        bot_share: args.bot_share,
        handover_share: args.handover_share,
        agents: args.agents,
        capacity: args.capacity,
        accept_delay: Duration::from_millis(args.accept_delay_ms),
        close_after: Duration::from_millis(args.close_after_ms),
        text_bytes: args.text_bytes,
        progress: (args.progress > 0.0).then(|| Duration::from_secs_f64(args.progress)),
        drain: Duration::from_secs_f64(args.drain),
        prefix: args.prefix,
        per_channel: args.per_channel,
    };
    if let Some(mix) = args.mix {
        mix.apply(&mut options);
    }
    firstline_shared::db::create_database_if_missing(&common.database_url).await?;
    firstline_shared::db::migrate(&common.database_url).await?;
    options.configure(&common.database_url).await?;
    if args.history > 0 {
        let h = firstline::history::seed(&common.database_url, &options, args.history).await?;
        println!(
            "history: {} conversations, {} messages, {} offers written in {:.1} s",
            h.conversations, h.messages, h.offers, h.seconds
        );
    }
    let workers = args.with_workers.then(|| {
        let stop = shutdown.child_token();
        (
            tokio::spawn(firstline::run_all(common.clone(), stop.clone())),
            stop,
        )
    });
    let client = firstline_shared::bus::connect(common).await?;
    let js = async_nats::jetstream::new(client.clone());
    firstline_shared::bus::ensure_streams_with(&js, common.stream_replicas, common.partitions)
        .await?;
    let report = load::run(client, &options, shutdown).await?;
    load::print_report(&report);
    if let Some((handle, stop)) = workers {
        stop.cancel();
        let _ = handle.await;
    }
    Ok(())
}

fn write_schemas(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, schema) in firstline_shared::wire::all_schemas() {
        let path = dir.join(format!("{name}.schema.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&schema)? + "\n")?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
