//! Client verbs (placeholder until the Kafka client lands).
#[derive(clap::Subcommand)]
pub enum ClientCommand {
    /// placeholder
    Placeholder,
}
pub async fn run(_cmd: ClientCommand) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
