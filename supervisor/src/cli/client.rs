//! The commands that talk to a running daemon over its control socket: `list`,
//! `status`, `policy explain --socket` and `stop` (`call` is `corral_client::call`,
//! shared with the `corral` front).

use super::exit::{self, Failure, Outcome};
use super::output::{print_plugins, print_status, print_status_json};
use crate::control::{ControlClient, default_socket_path};
use anyhow::{Context, bail};
use corral_protocol::{ControlRequest, ControlResponse};
use std::path::PathBuf;

/// An answer the daemon should not have given to this request.
fn unexpected(other: ControlResponse) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {other:?}")
}

pub(super) async fn list(json: bool, socket: Option<PathBuf>) -> Outcome {
    match request(socket, &ControlRequest::List).await? {
        ControlResponse::Plugins(plugins) => {
            print_plugins(&plugins, json)?;
            Ok(exit::OK)
        }
        other => Err(unexpected(other)),
    }
}

pub(super) async fn status(json: bool, socket: Option<PathBuf>) -> Outcome {
    let policy = match request(socket.clone(), &ControlRequest::Policy).await? {
        ControlResponse::Policy(p) => p,
        other => return Err(unexpected(other)),
    };
    match request(socket, &ControlRequest::List).await? {
        ControlResponse::Plugins(plugins) if json => print_status_json(&policy, &plugins)?,
        ControlResponse::Plugins(plugins) => print_status(&policy, &plugins)?,
        other => return Err(unexpected(other)),
    }
    Ok(exit::OK)
}

pub(super) async fn explain(plugin: String, socket: PathBuf, json: bool) -> Outcome {
    match request(Some(socket), &ControlRequest::Explain { plugin, json }).await? {
        ControlResponse::Explained(Ok(text)) if json => {
            println!("{text}");
            Ok(exit::OK)
        }
        ControlResponse::Explained(Ok(text)) => {
            print!("{text}");
            Ok(exit::OK)
        }
        ControlResponse::Explained(Err(why)) => Err(Failure::new(exit::NOT_FOUND, why).into()),
        other => Err(unexpected(other)),
    }
}

pub(super) async fn stop(socket: Option<PathBuf>, json: bool) -> Outcome {
    request(socket, &ControlRequest::Shutdown).await?;
    if json {
        super::output::print_json(&serde_json::json!({ "ok": true, "stopping": true }))?;
    }
    Ok(exit::OK)
}

/// Send one request to the daemon; a [`Failure`] with [`exit::UNREACHABLE`] when it
/// cannot be reached.
async fn request(socket: Option<PathBuf>, req: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let path = socket.unwrap_or_else(default_socket_path);
    let mut client = match ControlClient::connect(&path).await {
        Ok(c) => c,
        Err(e) => return Err(Failure::chain(exit::UNREACHABLE, &e).into()),
    };
    match client
        .request(req)
        .await
        .context("the daemon did not answer")?
    {
        ControlResponse::Rejected(why) => bail!("the daemon rejected the request: {why}"),
        resp => Ok(resp),
    }
}
