//! Glue between the launcher's API and the migration engine.

use std::sync::Arc;

use serde_json::Value;

use crate::launch::api::MigrationHandler;
use crate::launch::runtime::Runtime;
use crate::launch::LaunchError;

/// The API's migration handler.
#[derive(Default)]
pub struct Handler;

impl MigrationHandler for Handler {
    fn migrate(&self, _runtime: &Arc<Runtime>, _body: &Value) -> (u16, Value) {
        (501, serde_json::json!({"error": "not wired yet"}))
    }
    fn cancel(&self) -> (u16, Value) {
        (
            409,
            serde_json::json!({"error": "no migration in progress"}),
        )
    }
}

/// Wait for an incoming migration in the background.
pub fn start_incoming(_uri: &str, _rt: Arc<Runtime>) -> Result<(), LaunchError> {
    Err(LaunchError::Migration("not wired yet".into()))
}
