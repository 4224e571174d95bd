use std::sync::Arc;

use redis::Commands as _;
use spillway_testhost::App;

use crate::support::{Redis, TestApp};

fn subscriber_app(redis: &Redis, sink: &str) -> (TestApp, Arc<App>) {
    let manifest = format!(
        r#"spin_manifest_version = 2
[application]
name = "sub"
[application.trigger.redis]
address = "redis://127.0.0.1:{{{{ redis_port }}}}"
[variables]
redis_port = {{ required = true }}
[[trigger.redis]]
channel = "events-{{{{ redis_port }}}}"
component = "subscriber"
[component.subscriber]
source = "{{subscriber}}"
allowed_outbound_hosts = ["redis://127.0.0.1:{{{{ redis_port }}}}"]
variables = {{ redis_address = "redis://127.0.0.1:{{{{ redis_port }}}}", sink_key = "{sink}" }}
"#
    );
    let t = TestApp::write(&manifest, &[]);
    let mut opts = t.options();
    opts.variables.insert("redis_port".into(), redis.port.to_string());
    let app = Arc::new(App::load(&opts).unwrap());
    (t, app)
}

/// Starts `app`'s Redis triggers in a task: the task, and the channel listing
/// once every subscription is active.
async fn start(app: &Arc<App>) -> (tokio::task::JoinHandle<anyhow::Result<()>>, String) {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let trigger = tokio::spawn(app.clone().run_redis_triggers(move |listing| {
        let _ = ready_tx.send(listing);
    }));
    (trigger, ready_rx.await.expect("trigger subscribed"))
}

/// Published messages are each handled once, in publication order, and a failing
/// handler does not stop the trigger.
#[tokio::test(flavor = "multi_thread")]
async fn messages_in_order_and_failures_do_not_stop_it() {
    let redis = Redis::start();
    let (_t, app) = subscriber_app(&redis, "sink");
    let (trigger, listing) = start(&app).await;
    assert!(listing.contains(&format!("/events-{}: [subscriber]", redis.port)), "{listing}");
    let mut conn = redis.conn();
    let channel = format!("events-{}", redis.port);
    let mut sent = Vec::new();
    for i in 0..50 {
        let msg = if i == 10 { "fail".to_owned() } else { format!("m{i}") };
        let receivers: i64 = conn.publish(&channel, &msg).unwrap();
        assert_eq!(receivers, 1);
        sent.push(msg);
    }
    // Each BLPOP blocks server-side until the next delivery is recorded.
    let mut got = Vec::new();
    for _ in &sent {
        let item: Option<(String, String)> = conn.blpop("sink", 30.0).unwrap();
        match item {
            Some((_, v)) => got.push(v),
            None => break,
        }
    }
    assert_eq!(got, sent, "guest output:\n{}", app.guest_output());
    assert!(!trigger.is_finished(), "the trigger keeps running after a failed message");
    trigger.abort();
}

/// A trigger that is stopped (its future dropped) stops listening: its
/// subscription's connection is closed, and a message published after has no
/// receiver. (Its listener once outlived it, and went on handling messages.)
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_trigger_listens_no_more() {
    let redis = Redis::start();
    let (_t, app) = subscriber_app(&redis, "sink");
    let (trigger, _) = start(&app).await;
    let mut conn = redis.conn();
    let channel = format!("events-{}", redis.port);
    let receivers: i64 = conn.publish(&channel, "m0").unwrap();
    assert_eq!(receivers, 1);
    trigger.abort();
    let _ = trigger.await;
    crate::support::eventually("the subscription is gone", std::time::Duration::from_secs(10), async || {
        redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query::<(String, i64)>(&mut redis.conn()).unwrap().1 == 0
    })
    .await;
    let receivers: i64 = conn.publish(&channel, "m1").unwrap();
    assert_eq!(receivers, 0, "a message after the stop reaches no listener");
}

/// An unreachable trigger address is a clear error naming it.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_address_is_a_clear_error() {
    let redis = Redis::start();
    let (_t, app) = subscriber_app(&redis, "sink");
    drop(redis);
    let err = app.run_redis_triggers(|_| {}).await.unwrap_err();
    assert!(format!("{err:#}").contains("Redis trigger failed to connect to redis://127.0.0.1:"), "{err:#}");
}
