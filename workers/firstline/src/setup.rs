//! Tenants, channels and agents from a JSON file (`firstline configure --file F`): each entry
//! is created or updated; what the file does not mention is left as it is. The whole file is
//! checked first and applied in one transaction, so a bad file changes nothing.

use firstline_shared::db::{
    self, TenantSettingsPatch, DISPATCH_CYCLE_SECONDS, OFFER_LIMIT, SERVICE_LEVEL_SECONDS,
};
use firstline_shared::domain::{self, AgentId, ChannelId, SkillSet, TenantId};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupFile {
    pub tenants: Vec<TenantSetup>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSetup {
    pub id: TenantId,
    #[serde(default)]
    pub name: Option<String>,
    /// SPEC D8, seconds.
    #[serde(default)]
    pub dispatch_cycle_seconds: Option<i32>,
    /// SPEC D1.
    #[serde(default)]
    pub offer_limit: Option<i32>,
    /// SPEC L4.
    #[serde(default)]
    pub handover_keywords: Option<Vec<String>>,
    #[serde(default)]
    pub bot_reply: Option<String>,
    #[serde(default)]
    pub handover_reply: Option<String>,
    /// SPEC SL: the service-level threshold T, seconds.
    #[serde(default)]
    pub service_level_seconds: Option<i32>,
    /// The customer's place in line: keywords and texts (docs/api.md).
    #[serde(default)]
    pub queue_position_keywords: Option<Vec<String>>,
    #[serde(default)]
    pub queue_position_reply: Option<String>,
    #[serde(default)]
    pub queue_position_reply_no_estimate: Option<String>,
    /// SPEC D11: the last agent who served a customer counts as responsible.
    #[serde(default)]
    pub last_agent_responsible: Option<bool>,
    #[serde(default)]
    pub channels: Vec<ChannelSetup>,
    #[serde(default)]
    pub agents: Vec<AgentSetup>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSetup {
    pub id: ChannelId,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    /// SPEC D4.
    #[serde(default)]
    pub required_skills: SkillSet,
    /// SPEC L2.
    #[serde(default = "yes")]
    pub bot_enabled: bool,
    /// SPEC D10: the default assignment weight of its conversations (1 to 1000000, default 1).
    #[serde(default)]
    pub weight: Option<i32>,
    /// The first version's strict queue priority, read from old configurations: weight
    /// `priority + 1` when no `weight` is given.
    #[serde(default)]
    pub priority: Option<i32>,
}

impl ChannelSetup {
    /// SPEC D10: the channel's weight, from `weight`, else the old `priority`, else 1.
    pub fn weight(&self) -> anyhow::Result<i32> {
        let weight = match (self.weight, self.priority) {
            (Some(w), _) => w,
            (None, Some(p)) => domain::weight_from_priority(p),
            (None, None) => 1,
        };
        domain::check_weight(weight)
            .map_err(|e| anyhow::anyhow!("channel {}: {e}", self.id.as_str()))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSetup {
    pub id: AgentId,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub skills: SkillSet,
    #[serde(default = "default_capacity")]
    pub capacity: i32,
}

fn default_kind() -> String {
    "webchat".into()
}
fn yes() -> bool {
    true
}
fn default_capacity() -> i32 {
    10
}

impl SetupFile {
    /// Parses and checks a file's text; the error names the problem.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: SetupFile = serde_json::from_str(text)?;
        for t in &file.tenants {
            if let Some(c) = t.dispatch_cycle_seconds {
                anyhow::ensure!(
                    DISPATCH_CYCLE_SECONDS.contains(&c),
                    "tenant {}: dispatch_cycle_seconds must be {} to {}, not {c}",
                    t.id,
                    DISPATCH_CYCLE_SECONDS.start(),
                    DISPATCH_CYCLE_SECONDS.end()
                );
            }
            if let Some(l) = t.offer_limit {
                anyhow::ensure!(
                    OFFER_LIMIT.contains(&l),
                    "tenant {}: offer_limit must be {} to {}, not {l}",
                    t.id,
                    OFFER_LIMIT.start(),
                    OFFER_LIMIT.end()
                );
            }
            if let Some(s) = t.service_level_seconds {
                anyhow::ensure!(
                    SERVICE_LEVEL_SECONDS.contains(&s),
                    "tenant {}: service_level_seconds must be {} to {}, not {s}",
                    t.id,
                    SERVICE_LEVEL_SECONDS.start(),
                    SERVICE_LEVEL_SECONDS.end()
                );
            }
            for a in &t.agents {
                anyhow::ensure!(
                    (0..=1000).contains(&a.capacity),
                    "tenant {} agent {}: capacity must be 0 to 1000",
                    t.id,
                    a.id
                );
            }
        }
        Ok(file)
    }

    /// Writes everything in one transaction.
    pub async fn apply(&self, client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
        let tx = client.transaction().await?;
        for t in &self.tenants {
            // Created with its id as its name; every setting (the name too) is then written by
            // the one writer of tenant settings.
            tx.execute(
                "INSERT INTO tenants (id, name) VALUES ($1, coalesce($2, $1))
                 ON CONFLICT (id) DO NOTHING",
                &[&t.id.as_str(), &t.name],
            )
            .await?;
            let settings = TenantSettingsPatch {
                name: t.name.clone(),
                dispatch_cycle_seconds: t.dispatch_cycle_seconds,
                offer_limit: t.offer_limit,
                handover_keywords: t.handover_keywords.clone(),
                bot_reply: t.bot_reply.clone(),
                handover_reply: t.handover_reply.clone(),
                kb_min_score: None,
                service_level_seconds: t.service_level_seconds,
                queue_position_keywords: t.queue_position_keywords.clone(),
                queue_position_reply: t.queue_position_reply.clone(),
                queue_position_reply_no_estimate: t.queue_position_reply_no_estimate.clone(),
                last_agent_responsible: t.last_agent_responsible,
            };
            db::update_tenant_settings(&tx, &t.id, &settings).await?;
            for c in &t.channels {
                tx.execute(
                    "INSERT INTO channels (tenant_id, id, kind, name, required_skills, bot_enabled, weight)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (tenant_id, id) DO UPDATE SET kind = $3, name = $4, required_skills = $5, bot_enabled = $6, weight = $7",
                    &[&t.id.as_str(), &c.id.as_str(), &c.kind, &c.name, &c.required_skills.to_vec(), &c.bot_enabled, &c.weight()?],
                )
                .await?;
            }
            for a in &t.agents {
                tx.execute(
                    "INSERT INTO agents (tenant_id, id, display_name, skills, capacity)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (tenant_id, id) DO UPDATE SET display_name = $3, skills = $4, capacity = $5",
                    &[&t.id.as_str(), &a.id.as_str(), &a.name, &a.skills.to_vec(), &a.capacity],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Connects, migrates and applies `file`.
pub async fn configure(database_url: &str, file: &SetupFile) -> anyhow::Result<()> {
    firstline_shared::db::migrate(database_url).await?;
    let (mut client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    file.apply(&mut client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_refused_with_the_problem_named() {
        let err = SetupFile::parse(r#"{"tenants":[{"id":"a.b"}]}"#).unwrap_err();
        assert!(err.to_string().contains("invalid tenant id"), "{err}");
        let err = SetupFile::parse(r#"{"tenants":[{"id":"a","offer_limit":0}]}"#).unwrap_err();
        assert!(
            err.to_string().contains("offer_limit must be 1 to 50"),
            "{err}"
        );
        let err = SetupFile::parse(r#"{"tenants":[{"id":"a","chanels":[]}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `chanels`"), "{err}");
        let ok = SetupFile::parse(
            r#"{"tenants":[{"id":"a","channels":[{"id":"line","required_skills":["EN"]}]}]}"#,
        )
        .unwrap();
        assert!(ok.tenants[0].channels[0].bot_enabled);
        assert_eq!(
            ok.tenants[0].channels[0].required_skills.to_vec(),
            vec!["en"]
        );
    }
}
