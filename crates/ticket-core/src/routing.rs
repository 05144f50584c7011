//! Request type to support team. The defaults are the original system's mapping; a user can
//! replace them with a JSON file without recompiling.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    teams: BTreeMap<String, String>,
    default_team: String,
}

/// The routing file's shape:
/// `{"teams": {"technical": "Tech Support", ...}, "default_team": "General Support"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    teams: BTreeMap<String, String>,
    default_team: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(
        "routing file is not valid JSON of the form {{\"teams\": {{\"<request_type>\": \"<team>\"}}, \"default_team\": \"<team>\"}}: {0}"
    )]
    Format(#[from] serde_json::Error),
    #[error("routing file gives an empty team name for {0:?}")]
    EmptyTeam(String),
}

impl Default for Routing {
    fn default() -> Self {
        let teams = [
            ("technical", "Tech Support"),
            ("billing", "Billing Team"),
            ("support", "Customer Service"),
        ];
        Routing {
            teams: teams
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            default_team: "General Support".to_string(),
        }
    }
}

impl Routing {
    pub fn from_json(text: &str) -> Result<Routing, RoutingError> {
        let file: RoutingFile = serde_json::from_str(text)?;
        if file.default_team.trim().is_empty() {
            return Err(RoutingError::EmptyTeam("default_team".into()));
        }
        if let Some((k, _)) = file.teams.iter().find(|(_, v)| v.trim().is_empty()) {
            return Err(RoutingError::EmptyTeam(k.clone()));
        }
        Ok(Routing {
            teams: file.teams,
            default_team: file.default_team,
        })
    }

    /// A short digest of the table (CRC32C of its canonical JSON, hex): what a checkpoint
    /// records so that a batch is never rebuilt with another table than the one it was
    /// committed with.
    pub fn digest(&self) -> String {
        let canonical = serde_json::json!({"teams": self.teams, "default_team": self.default_team});
        format!("{:08x}", crc32c::crc32c(canonical.to_string().as_bytes()))
    }

    /// The team for a request type; matching is exact, as in the original.
    pub fn team_for(&self, request_type: &str) -> &str {
        self.teams.get(request_type).unwrap_or(&self.default_team)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_original_mapping() {
        let r = Routing::default();
        assert_eq!(r.team_for("technical"), "Tech Support");
        assert_eq!(r.team_for("billing"), "Billing Team");
        assert_eq!(r.team_for("support"), "Customer Service");
        assert_eq!(r.team_for("other"), "General Support");
        assert_eq!(r.team_for("Billing"), "General Support");
        assert_eq!(r.team_for(""), "General Support");
    }

    #[test]
    fn a_file_replaces_the_mapping() {
        let r = Routing::from_json(
            r#"{"teams": {"billing": "Finance", "sales": "Sales"}, "default_team": "Triage"}"#,
        )
        .expect("valid file");
        assert_eq!(r.team_for("billing"), "Finance");
        assert_eq!(r.team_for("sales"), "Sales");
        assert_eq!(r.team_for("technical"), "Triage");
    }

    #[test]
    fn the_digest_changes_with_the_table_and_only_with_it() {
        let same = Routing::from_json(
            r#"{"default_team": "General Support", "teams": {"support": "Customer Service", "billing": "Billing Team", "technical": "Tech Support"}}"#,
        )
        .expect("valid file");
        assert_eq!(same.digest(), Routing::default().digest());
        let other = Routing::from_json(
            r#"{"teams": {"billing": "Finance"}, "default_team": "General Support"}"#,
        )
        .expect("valid file");
        assert_ne!(other.digest(), Routing::default().digest());
    }

    #[test]
    fn a_bad_file_says_what_is_wrong() {
        let e =
            Routing::from_json(r#"{"teams": {"billing": ""}, "default_team": "T"}"#).unwrap_err();
        assert!(e.to_string().contains("\"billing\""), "{e}");
        let e = Routing::from_json(r#"{"team": {}}"#).unwrap_err();
        assert!(
            e.to_string().contains("routing file is not valid JSON"),
            "{e}"
        );
    }
}
