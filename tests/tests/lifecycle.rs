//! Reload and restart of a pinned agent on the namespace testbed, with the
//! real program: instance ids stay with their names whatever the config's
//! order, established TCP connections keep their instance, a refused
//! reload changes nothing, drains survive, and a lost state file is rebuilt
//! from the pinned owners.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use sluice::{
    agent::Agent,
    config::Config,
    coord::{CoordStore, EmbeddedStore},
    datapath::Datapath as _,
    plan::Group,
};
use sluice_common::UNITS_PER_SERVICE;
use sluice_tests::{
    block_on, netns,
    process::PinDir,
    testbed::{self, Testbed},
    traffic::{TcpServers, tcp_echo},
};

fn testbed(tag: &str, n: usize) -> Testbed {
    Testbed::new(tag, n).unwrap_or_else(|e| panic!("building the testbed: {e}"))
}

/// A pinning TCP service on port 8080 with the testbed's instances `order`.
fn web(tb: &Testbed, order: &[usize], agent_extra: &str) -> Config {
    let mut toml = format!(
        "[agent]\n{agent_extra}\n[[service]]\nname = \"web\"\nvip = \"{}\"\nport = 8080\nprotocol = \"tcp\"\n\n",
        testbed::VIP_V4
    );
    for &k in order {
        toml.push_str(&tb.instances_toml(k, 1));
    }
    Config::parse(&toml, Path::new("web.toml")).unwrap_or_else(|e| panic!("config: {e}"))
}

fn ids(agent: &Agent) -> HashMap<String, u32> {
    agent
        .plan
        .instances
        .iter()
        .map(|i| (i.name.clone(), i.id))
        .collect()
}

/// Every connection answers from the instance it answered from first.
fn all_answer_from_their_instance(conns: &mut [(TcpStream, String)], when: &str) {
    for (c, (s, who)) in conns.iter_mut().enumerate() {
        let now = tcp_echo(s, &format!("{when} {c}"))
            .unwrap_or_else(|e| panic!("connection {c} ({who}) broke {when}: {e}"));
        assert_eq!(&now, who, "connection {c} changed instance {when}");
    }
}

/// Defect: ids followed the config's order, so a reload or restart with the
/// instances reordered adopted the pins and every established TCP flow
/// pointed at another instance.
#[test]
fn tcp_connections_keep_their_instance_through_reorders() {
    let tb = testbed("ord", 3);
    let pins = PinDir::new("ord");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let store: Arc<dyn CoordStore> = Arc::new(EmbeddedStore::open(&state).expect("store"));
    let mut agent = tb
        .start_pinned_agent(&web(&tb, &[0, 1, 2], ""), store.clone(), &pins.0)
        .unwrap_or_else(|e| panic!("start: {e:?}"));
    let first_ids = ids(&agent);
    let dst = SocketAddr::new(testbed::VIP_V4.into(), 8080);
    let ns: Vec<String> = tb.instances.iter().map(|i| i.netns.clone()).collect();
    let names: Vec<String> = (0..3).map(|k| format!("inst-{k}")).collect();
    let servers = TcpServers::start(&ns, dst, &names);
    let mut conns: Vec<(TcpStream, String)> = (0..24)
        .map(|c| {
            let mut s = netns::run_in(&tb.client, || {
                TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            })
            .unwrap_or_else(|e| panic!("connection {c}: {e}"));
            let who = tcp_echo(&mut s, &format!("hello {c}")).expect("first exchange");
            (s, who)
        })
        .collect();
    let reached: std::collections::HashSet<&str> = conns.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(reached.len(), 3, "connections on every instance");

    // A reload with the instances in another order.
    tb.reload_agent(
        &mut agent,
        &web(&tb, &[2, 0, 1], ""),
        store.clone(),
        &pins.0,
    )
    .unwrap_or_else(|e| panic!("reload: {e:?}"));
    assert_eq!(ids(&agent), first_ids, "ids stay with their names");
    all_answer_from_their_instance(&mut conns, "after a reordering reload");

    // A restart (the data path stays pinned) in yet another order.
    drop(agent);
    let store: Arc<dyn CoordStore> = Arc::new(EmbeddedStore::open(&state).expect("store"));
    let agent = tb
        .start_pinned_agent(&web(&tb, &[1, 2, 0], ""), store, &pins.0)
        .unwrap_or_else(|e| panic!("restart: {e:?}"));
    assert_eq!(ids(&agent), first_ids, "ids stay with their names");
    all_answer_from_their_instance(&mut conns, "after a reordering restart");
    let svc = agent.datapath.service_counters(0).expect("counters");
    eprintln!(
        "{} connections answered by their own instance after a reordering reload and restart; pin hits {}, pins lost {}",
        conns.len(),
        svc.pin_hits,
        svc.pins_lost
    );
    assert_eq!(svc.pins_lost, 0, "no established flow lost its pin");
    for (s, _) in &conns {
        s.shutdown(std::net::Shutdown::Both).ok();
    }
    drop(conns);
    let errors = servers.finish();
    assert!(errors.iter().all(|e| !e.contains("reset")), "{errors:?}");
    drop(agent);
}

/// Owner of every unit of service 0 in the data path.
fn owners(agent: &Agent) -> Vec<u32> {
    (0..UNITS_PER_SERVICE)
        .map(|u| agent.datapath.owner_of_unit(0, u))
        .collect()
}

/// Defect: `Controller::new` reset the store (here: the stored assignment
/// names a removed instance) before the data path refused the reload on a
/// pinned map's size, and the maps were written before the new program was
/// attached. A refused reload now changes neither; and drained and failed
/// instances stay so across a reload that applies.
#[test]
fn a_refused_reload_changes_nothing_and_drains_survive_reloads() {
    let tb = testbed("rfz", 3);
    let pins = PinDir::new("rfz");
    let store: Arc<dyn CoordStore> = Arc::new(EmbeddedStore::in_memory());
    let mut agent = tb
        .start_pinned_agent(&web(&tb, &[0, 1, 2], ""), store.clone(), &pins.0)
        .unwrap_or_else(|e| panic!("start: {e:?}"));
    let group: Group = "0x0000/3".parse().expect("group");
    block_on(
        agent
            .control
            .move_group(&mut agent.datapath, "web", group, "inst-2"),
    )
    .expect("move");
    let stored = block_on(store.groups("web")).expect("groups");
    let in_maps = owners(&agent);

    // inst-2 removed (its groups would change hands) and a pinned-flow map
    // of another size (the pinned one cannot be resized): refused.
    let refused = tb.reload_agent(
        &mut agent,
        &web(&tb, &[0, 1], "pinned_flows = 4096\n"),
        store.clone(),
        &pins.0,
    );
    let e = refused.expect_err("a reload that cannot adopt the pins");
    assert!(format!("{e}").contains("PINNED"), "{e}");
    assert_eq!(
        block_on(store.groups("web")).expect("groups"),
        stored,
        "the store is as it was"
    );
    assert_eq!(owners(&agent), in_maps, "the maps are as they were");
    assert_eq!(
        sluice::datapath::xdp::XdpDatapath::registered_instances(&pins.0).expect("registry"),
        vec![
            (1, "inst-0".to_owned()),
            (2, "inst-1".to_owned()),
            (3, "inst-2".to_owned())
        ],
        "the id registry is as it was"
    );

    // A drained instance stays drained across a reload that applies.
    agent.control.set_drained("inst-1", true).expect("drain");
    tb.reload_agent(
        &mut agent,
        &web(&tb, &[1, 0, 2], ""),
        store.clone(),
        &pins.0,
    )
    .unwrap_or_else(|e| panic!("reload: {e:?}"));
    assert!(agent.control.is_drained("inst-1"), "the drain survives");
    assert_eq!(
        block_on(store.groups("web")).expect("groups"),
        stored,
        "a reload with the same instances resumes the assignment as it is"
    );
    assert_eq!(owners(&agent), in_maps);
    drop(agent);
}

/// Defect: a corrupt state file was refused; the fix offered (move it
/// away) made the agent start from an even assignment, moving every flow
/// that did not hold a pin. The file is moved aside and the assignment
/// rebuilt from the owners the pinned data path holds.
#[test]
fn a_corrupt_state_file_is_rebuilt_from_the_pinned_owners() {
    let tb = testbed("cor", 2);
    let pins = PinDir::new("cor");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let config = web(&tb, &[0, 1], "");
    let store: Arc<dyn CoordStore> = Arc::new(EmbeddedStore::open(&state).expect("store"));
    let mut agent = tb
        .start_pinned_agent(&config, store.clone(), &pins.0)
        .unwrap_or_else(|e| panic!("start: {e:?}"));
    for g in ["0x0000/4", "0x9000/4", "0xf800/5"] {
        let to = if g == "0x9000/4" { "inst-0" } else { "inst-1" };
        block_on(agent.control.move_group(
            &mut agent.datapath,
            "web",
            g.parse().expect("group"),
            to,
        ))
        .expect("move");
    }
    let in_maps = owners(&agent);
    drop(agent);
    std::fs::write(
        &state,
        b"{\"next_version\": 12, \"services\": {\"web\": [{\"gro",
    )
    .expect("corrupt");

    let (store, aside) = EmbeddedStore::open_or_recover(&state).expect("recovered");
    assert!(
        aside.is_some_and(|p| p.exists()),
        "the corrupt file is kept"
    );
    let store: Arc<dyn CoordStore> = Arc::new(store);
    let agent = tb
        .start_pinned_agent(&config, store.clone(), &pins.0)
        .unwrap_or_else(|e| panic!("restart: {e:?}"));
    assert!(agent.plan.services[0].groups_from_pins);
    assert_eq!(owners(&agent), in_maps, "every unit keeps its owner");
    let rebuilt = block_on(store.groups("web")).expect("the store has it again");
    for e in &rebuilt {
        let id = ids(&agent)[&e.owner];
        assert!(
            e.group.units().all(|u| in_maps[u as usize] == id),
            "{}",
            e.group
        );
    }
    drop(agent);
}
