//! A tenant's bot configuration from a YAML or JSON file (`firstline bot load --file F`):
//! settings, per-channel bot settings (welcome flow, idle time, business hours, survey),
//! keyword rules, knowledge-base articles and flows. Sections the file has replace what is
//! stored (`keyword_rules`, `articles`) or update it (settings, channels, flows by id); sections
//! it lacks are left alone. Everything is checked, then written in one transaction: a bad
//! file is refused with the problem named, and nothing stored changes.
//!
//! Flows are stored as drafts; `publish: true` in the file (or `firstline bot publish`) checks
//! a draft and freezes it as the next version (草稿與發佈).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context as _;
use firstline_shared::db::{self, TenantSettingsPatch};
use firstline_shared::domain::{ChannelId, SkillSet, TenantId};
use firstline_shared::hours::BusinessHours;
use firstline_shared::survey::Survey;
use serde::{Deserialize, Deserializer};
use tokio_postgres::GenericClient;

use crate::flow::{FlowDef, Step};
use crate::kb::Article;
use crate::keywords::{KeywordMatcher, KeywordRule};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotFile {
    pub tenant: TenantId,
    /// SPEC L4: whole messages that hand over to an agent.
    #[serde(default)]
    pub handover_keywords: Option<Vec<String>>,
    /// What the bot says when nothing matches.
    #[serde(default)]
    pub fallback_reply: Option<String>,
    #[serde(default)]
    pub handover_reply: Option<String>,
    /// An article answers when its score (0..1) reaches this.
    #[serde(default)]
    pub kb_min_score: Option<f64>,
    #[serde(default)]
    pub channels: Vec<ChannelBotSetup>,
    #[serde(default)]
    pub keyword_rules: Option<Vec<KeywordRule>>,
    #[serde(default)]
    pub articles: Option<Vec<Article>>,
    #[serde(default)]
    pub flows: Vec<FlowSetup>,
}

/// A channel's bot settings; a field left out keeps its stored value, `null` clears it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelBotSetup {
    pub id: ChannelId,
    /// SPEC L2.
    #[serde(default)]
    pub bot_enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub welcome_flow: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub bot_idle_seconds: Option<Option<i32>>,
    #[serde(default, deserialize_with = "nullable")]
    pub business_hours: Option<Option<BusinessHours>>,
    #[serde(default, deserialize_with = "nullable")]
    pub survey: Option<Option<Survey>>,
}

/// Present (`Some`, possibly `Some(None)` for `null`) versus absent (`None`, by `default`).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSetup {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Check the draft and publish it as the next version (if it differs from the latest).
    #[serde(default)]
    pub publish: bool,
    pub start: String,
    #[serde(default)]
    pub handover_skills: SkillSet,
    pub steps: std::collections::BTreeMap<String, Step>,
}

impl FlowSetup {
    fn definition(&self) -> FlowDef {
        FlowDef {
            start: self.start.clone(),
            handover_skills: self.handover_skills.clone(),
            steps: self.steps.clone(),
        }
    }
}

impl BotFile {
    /// Reads a `.json` file as JSON and anything else as YAML; the error names the file and
    /// the place in it.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::parse(&text, is_json).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, json: bool) -> anyhow::Result<Self> {
        let file: Self = if json {
            serde_json::from_str(text)?
        } else {
            serde_yaml_ng::from_str(text)?
        };
        file.check().map_err(anyhow::Error::msg)?;
        Ok(file)
    }

    /// Everything that can be checked without the database.
    pub fn check(&self) -> Result<(), String> {
        if let Some(s) = self.kb_min_score {
            if !(s > 0.0 && s <= 1.0) {
                return Err(format!(
                    "kb_min_score must be above 0 and at most 1, not {s}"
                ));
            }
        }
        if let Some(k) = &self.handover_keywords {
            if k.iter().any(|k| k.trim().is_empty()) {
                return Err("handover_keywords: a keyword is empty".into());
            }
        }
        for c in &self.channels {
            let fail = |why: String| Err(format!("channel {}: {why}", c.id));
            if let Some(Some(s)) = c.bot_idle_seconds {
                if s < 1 {
                    return fail(format!("bot_idle_seconds must be at least 1, not {s}"));
                }
            }
            if let Some(Some(h)) = &c.business_hours {
                if let Err(e) = h.compile() {
                    return fail(e);
                }
            }
            if let Some(Some(s)) = &c.survey {
                s.check().or_else(fail)?;
            }
        }
        if let Some(rules) = &self.keyword_rules {
            KeywordMatcher::new(rules.clone())?;
        }
        if let Some(articles) = &self.articles {
            let mut ids = BTreeSet::new();
            for a in articles {
                if a.id.trim().is_empty() {
                    return Err(format!("an article has an empty id (title {:?})", a.title));
                }
                if !ids.insert(a.id.as_str()) {
                    return Err(format!("article id {:?} is used twice", a.id));
                }
                if a.title.trim().is_empty() || a.body.trim().is_empty() {
                    return Err(format!(
                        "article {:?}: title and body must not be empty",
                        a.id
                    ));
                }
            }
        }
        let mut flow_ids = BTreeSet::new();
        for f in &self.flows {
            if f.id.is_empty() || f.id.len() > 64 {
                return Err(format!("flow id {:?} must be 1 to 64 characters", f.id));
            }
            if !flow_ids.insert(f.id.as_str()) {
                return Err(format!("flow {:?} is defined twice", f.id));
            }
            if f.publish {
                f.definition()
                    .check()
                    .map_err(|e| format!("flow {:?} cannot be published: {e}", f.id))?;
            }
        }
        Ok(())
    }

    /// Writes the file in one transaction; on any error nothing changes.
    pub async fn apply(&self, client: &mut tokio_postgres::Client) -> anyhow::Result<Applied> {
        let tx = client.transaction().await?;
        let tenant = self.tenant.as_str();
        let settings = TenantSettingsPatch {
            handover_keywords: self.handover_keywords.clone(),
            bot_reply: self.fallback_reply.clone(),
            handover_reply: self.handover_reply.clone(),
            kb_min_score: self.kb_min_score.map(|s| s as f32),
            ..TenantSettingsPatch::default()
        };
        let updated = db::update_tenant_settings(&tx, &self.tenant, &settings).await?;
        anyhow::ensure!(
            updated == 1,
            "tenant {tenant} does not exist: create it first with `firstline configure`"
        );
        let mut applied = Applied::default();
        for f in &self.flows {
            tx.execute(
                "INSERT INTO flows (tenant_id, id, name, draft) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant_id, id) DO UPDATE SET name = $3, draft = $4, updated_at = now()",
                &[&tenant, &f.id, &f.name, &serde_json::to_value(f.definition())?],
            )
            .await?;
            if f.publish {
                if let Some(v) = publish(&tx, &self.tenant, &f.id).await? {
                    applied.published.push((f.id.clone(), v));
                }
            }
        }
        if let Some(rules) = &self.keyword_rules {
            tx.execute("DELETE FROM keyword_rules WHERE tenant_id = $1", &[&tenant])
                .await?;
            for r in rules {
                if let Some(flow) = &r.reply.flow {
                    ensure_published(&tx, tenant, flow)
                        .await
                        .with_context(|| format!("keyword rule {:?}", r.id))?;
                }
                tx.execute(
                    "INSERT INTO keyword_rules (tenant_id, id, priority, match_kind, pattern, channels, reply)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &tenant,
                        &r.id,
                        &r.priority,
                        &r.kind.as_str(),
                        &r.pattern,
                        &r.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                        &serde_json::to_value(&r.reply)?,
                    ],
                )
                .await?;
            }
            applied.keyword_rules = Some(rules.len());
        }
        if let Some(articles) = &self.articles {
            tx.execute("DELETE FROM kb_articles WHERE tenant_id = $1", &[&tenant])
                .await?;
            // One statement per 1,000 articles.
            for chunk in articles.chunks(1000) {
                let ids: Vec<&str> = chunk.iter().map(|a| a.id.as_str()).collect();
                let titles: Vec<&str> = chunk.iter().map(|a| a.title.as_str()).collect();
                let bodies: Vec<&str> = chunk.iter().map(|a| a.body.as_str()).collect();
                let tags: Vec<String> = chunk
                    .iter()
                    .map(|a| serde_json::to_string(&a.tags).expect("strings serialize"))
                    .collect();
                tx.execute(
                    "INSERT INTO kb_articles (tenant_id, id, title, body, tags)
                     SELECT $1, id, title, body, ARRAY(SELECT jsonb_array_elements_text(tags::jsonb))
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS a(id, title, body, tags)",
                    &[&tenant, &ids, &titles, &bodies, &tags],
                )
                .await?;
            }
            applied.articles = Some(articles.len());
        }
        for c in &self.channels {
            let exists = tx
                .execute(
                    "UPDATE channels SET bot_enabled = coalesce($3, bot_enabled) WHERE tenant_id = $1 AND id = $2",
                    &[&tenant, &c.id.as_str(), &c.bot_enabled],
                )
                .await?;
            anyhow::ensure!(
                exists == 1,
                "channel {} of tenant {tenant} does not exist: create it first with `firstline configure`",
                c.id
            );
            if let Some(flow) = &c.welcome_flow {
                if let Some(flow) = flow {
                    ensure_published(&tx, tenant, flow)
                        .await
                        .with_context(|| format!("channel {} welcome_flow", c.id))?;
                }
                tx.execute(
                    "UPDATE channels SET welcome_flow = $3 WHERE tenant_id = $1 AND id = $2",
                    &[&tenant, &c.id.as_str(), flow],
                )
                .await?;
            }
            if let Some(idle) = &c.bot_idle_seconds {
                tx.execute(
                    "UPDATE channels SET bot_idle_seconds = $3 WHERE tenant_id = $1 AND id = $2",
                    &[&tenant, &c.id.as_str(), idle],
                )
                .await?;
            }
            if let Some(hours) = &c.business_hours {
                let value = hours.as_ref().map(serde_json::to_value).transpose()?;
                tx.execute(
                    "UPDATE channels SET business_hours = $3 WHERE tenant_id = $1 AND id = $2",
                    &[&tenant, &c.id.as_str(), &value],
                )
                .await?;
            }
            if let Some(survey) = &c.survey {
                let value = survey.as_ref().map(serde_json::to_value).transpose()?;
                tx.execute(
                    "UPDATE channels SET survey = $3 WHERE tenant_id = $1 AND id = $2",
                    &[&tenant, &c.id.as_str(), &value],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }
}

/// What a load wrote.
#[derive(Debug, Default)]
pub struct Applied {
    pub keyword_rules: Option<usize>,
    pub articles: Option<usize>,
    /// Flows published, with their new version.
    pub published: Vec<(String, i32)>,
}

async fn ensure_published(
    client: &impl GenericClient,
    tenant: &str,
    flow: &str,
) -> anyhow::Result<()> {
    let published = client
        .query_opt(
            "SELECT 1 FROM flow_versions WHERE tenant_id = $1 AND flow_id = $2 LIMIT 1",
            &[&tenant, &flow],
        )
        .await?
        .is_some();
    anyhow::ensure!(
        published,
        "flow {flow:?} does not exist or has no published version (add `publish: true` to it)"
    );
    Ok(())
}

/// Checks the flow's draft and stores it as the next version; `None` when it equals the
/// latest published version (nothing to publish). The error names the graph's problem.
pub async fn publish(
    client: &impl GenericClient,
    tenant: &TenantId,
    flow: &str,
) -> anyhow::Result<Option<i32>> {
    let row = client
        .query_opt(
            "SELECT draft FROM flows WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            &[&tenant.as_str(), &flow],
        )
        .await?
        .with_context(|| format!("tenant {tenant} has no flow {flow:?}"))?;
    let draft: serde_json::Value = row.get(0);
    let def: FlowDef = serde_json::from_value(draft.clone())
        .map_err(|e| anyhow::anyhow!("flow {flow:?} cannot be published: {e}"))?;
    def.check()
        .map_err(|e| anyhow::anyhow!("flow {flow:?} cannot be published: {e}"))?;
    let latest = client
        .query_opt(
            "SELECT version, definition FROM flow_versions WHERE tenant_id = $1 AND flow_id = $2
             ORDER BY version DESC LIMIT 1",
            &[&tenant.as_str(), &flow],
        )
        .await?;
    if let Some(l) = &latest {
        if l.get::<_, serde_json::Value>(1) == draft {
            return Ok(None);
        }
    }
    let version = latest.map_or(1, |l| l.get::<_, i32>(0) + 1);
    client
        .execute(
            "INSERT INTO flow_versions (tenant_id, flow_id, version, definition) VALUES ($1, $2, $3, $4)",
            &[&tenant.as_str(), &flow, &version, &draft],
        )
        .await?;
    Ok(Some(version))
}

/// Connects, migrates and loads `file`.
pub async fn load(database_url: &str, file: &BotFile) -> anyhow::Result<Applied> {
    firstline_shared::db::migrate(database_url).await?;
    let (mut client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    file.apply(&mut client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
tenant: acme
handover_keywords: [轉真人, agent]
kb_min_score: 0.5
channels:
  - id: line
    welcome_flow: null
    business_hours:
      timezone: Asia/Taipei
      weekly: {mon: [["09:00", "18:00"]]}
      closed_message: 非營業時間
    survey: {question: 請評分, scale: 5}
keyword_rules:
  - {id: hours, match: contains, pattern: 營業時間, reply: {text: 每天九點到六點}}
articles:
  - {id: a1, title: 退款, body: 七天內退款, tags: [退貨]}
flows:
  - id: orders
    publish: true
    start: menu
    steps:
      menu: {type: buttons, text: 請選擇, buttons: [{label: 找專員, next: agent}, {label: 結束, next: bye}]}
      agent: {type: handover, skills: [billing]}
      bye: {type: end}
"#;

    #[test]
    fn a_good_yaml_file_reads() {
        let f = BotFile::parse(GOOD, false).unwrap();
        assert_eq!(f.channels[0].welcome_flow, Some(None));
        assert_eq!(f.channels[0].bot_idle_seconds, None);
        assert!(matches!(f.channels[0].survey, Some(Some(_))));
        assert_eq!(f.flows[0].steps.len(), 3);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let bad = |from: &str, to: &str| {
            BotFile::parse(&GOOD.replace(from, to), false)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(
            "match: contains, pattern: 營業時間",
            "match: regex, pattern: '營業('"
        )
        .contains("keyword rule \"hours\""));
        assert!(bad("next: bye", "next: byebye")
            .contains("flow \"orders\" cannot be published: step \"menu\" button 2"));
        assert!(bad("Asia/Taipei", "Asia/Taipie").contains("channel line:"));
        assert!(bad("scale: 5", "scale: 11").contains("scale must be 2 to 10"));
        assert!(bad("kb_min_score: 0.5", "kb_min_score: 0").contains("kb_min_score"));
        assert!(bad("match: contains", "match: fuzzy").contains("unknown variant `fuzzy`"));
        assert!(bad("id: a1", "id: ''").contains("empty id"));
    }
}
