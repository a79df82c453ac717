use sluice_tests::{harness::*, packet::Packet};

#[test]
fn smoke() {
    let h = Harness::new(
        r#"
[[service]]
name = "kv"
vip = "198.18.1.1"
port = 7000
protocol = "udp"
[[service.instance]]
name = "a"
veth = "va"
mac = "02:00:00:00:00:01"
[[service.instance]]
name = "b"
veth = "vb"
mac = "02:00:00:00:00:02"
"#,
    );
    let f = Packet::udp(
        "198.18.0.1:1000".parse().unwrap(),
        "198.18.1.1:7000".parse().unwrap(),
    )
    .payload(b"hi".to_vec())
    .build();
    let r = h.run(&f);
    eprintln!("{r:?}");
    eprintln!("{:?}", h.global());
}
