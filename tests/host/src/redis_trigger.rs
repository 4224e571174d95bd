//! The Redis trigger, as Spin runs it: one pub/sub connection per address subscribed
//! to all its channels; messages handled one at a time, in arrival order, each by a
//! fresh instance of every component subscribed to its channel; a failing handler is
//! logged and the next message goes on.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use wasmtime::component::Linker;

use crate::app::{App, LoadedComponent};
use crate::host::trigger::RedisTriggerPre;
use crate::state::StoreData;

/// One `[[trigger.redis]]`, resolved.
pub(crate) struct Subscription {
    address: String,
    channel: String,
    loaded: Arc<LoadedComponent>,
    pre: RedisTriggerPre<StoreData>,
}

impl Subscription {
    pub(crate) fn new(address: String, channel: String, loaded: Arc<LoadedComponent>, linker: &Linker<StoreData>) -> anyhow::Result<Self> {
        let id = &loaded.caps.id;
        let pre = linker
            .instantiate_pre(&loaded.component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("component {id:?}: its imports cannot be satisfied"))?;
        let pre = RedisTriggerPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("component {id:?} does not export spin:redis/inbound-redis@3.0.0"))?;
        Ok(Self { address, channel, loaded, pre })
    }

    async fn deliver(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut store = crate::engine::new_store(StoreData::new(self.loaded.caps.clone()));
        let instance = self.pre.instantiate_async(&mut store).await?;
        let result = store
            .run_concurrent(async |accessor| {
                instance
                    .spin_redis_inbound_redis()
                    .call_handle_message(accessor, payload)
                    .await
            })
            .await??;
        result.map_err(|e| anyhow::anyhow!("Redis handler returned an error: {e:?}"))
    }
}

impl App {
    /// Whether the app has Redis triggers.
    pub fn has_redis_triggers(&self) -> bool {
        !self.subscriptions.is_empty()
    }

    /// Subscribes to every Redis trigger's channel and handles messages until a
    /// connection fails; `ready` is called once all subscriptions are active, with
    /// the `Active Channels` lines Spin prints.
    pub async fn run_redis_triggers(self: Arc<Self>, ready: impl FnOnce(String)) -> anyhow::Result<()> {
        let mut by_address: BTreeMap<&str, BTreeMap<&str, Vec<usize>>> = BTreeMap::new();
        for (i, s) in self.subscriptions.iter().enumerate() {
            by_address.entry(&s.address).or_default().entry(&s.channel).or_default().push(i);
        }
        let mut listing = String::new();
        // A set that aborts its tasks when dropped: when this future is
        // dropped (a caller stops the trigger), no listener is left running.
        let mut tasks = tokio::task::JoinSet::new();
        for (address, channels) in by_address {
            // Errors name the server without its credentials.
            let server = crate::outbound::destination(address, "redis");
            let client = redis::Client::open(address)
                .with_context(|| format!("invalid Redis trigger address {server:?}"))?;
            let mut pubsub = client
                .get_async_pubsub()
                .await
                .with_context(|| format!("Redis trigger failed to connect to {server}"))?;
            let info = client.get_connection_info().addr().to_string();
            listing.push_str(&format!("Active Channels on {info}:\n"));
            for (channel, subs) in &channels {
                pubsub
                    .subscribe(*channel)
                    .await
                    .with_context(|| format!("Redis trigger failed to subscribe to {channel:?} on {server}"))?;
                let ids: Vec<&str> = subs.iter().map(|&i| self.subscriptions[i].loaded.caps.id.as_str()).collect();
                listing.push_str(&format!("\t{info}/{channel}: [{}]\n", ids.join(",")));
            }
            let routes: BTreeMap<String, Vec<usize>> =
                channels.into_iter().map(|(c, s)| (c.to_owned(), s)).collect();
            let app = self.clone();
            tasks.spawn(async move {
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let channel = msg.get_channel_name().to_owned();
                    let payload = msg.get_payload_bytes().to_vec();
                    let Some(subs) = routes.get(&channel) else { continue };
                    let runs = subs.iter().map(|&i| {
                        let sub = &app.subscriptions[i];
                        let payload = payload.clone();
                        async move {
                            if let Err(e) = sub.deliver(payload).await {
                                eprintln!("Component {} handler failed: {e:#}", sub.loaded.caps.id);
                            }
                        }
                    });
                    futures::future::join_all(runs).await;
                }
                bail!("disconnected from {server}")
            });
        }
        ready(listing);
        if tasks.is_empty() {
            return std::future::pending().await;
        }
        let first = tasks.join_next().await.expect("at least one listener");
        tasks.abort_all();
        first.context("Redis trigger task panicked")?
    }
}
