//! The `quotad` binary: configuration → telemetry → application → serve until a signal.

use quotad::{config::Config, startup::Application, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    telemetry::init_tracing();
    let app = Application::build(config).await?;
    app.run_until(quotad::startup::shutdown_signal()).await
}
