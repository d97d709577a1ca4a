use super::*;

#[test]
fn time_format() {
    assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
    assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
}

#[test]
fn round_trip_and_render() {
    let d = tempfile::tempdir().unwrap();
    let s = Status {
        format: STATUS_FORMAT,
        agent_id: cairn_core::AgentId::parse("a").unwrap(),
        channel: "stable".into(),
        sources: vec![SourceStatus {
            source: "/x".into(),
            ..Default::default()
        }],
        ..Status::new(cairn_core::AgentId::parse("a").unwrap())
    };
    s.write(d.path()).unwrap();
    let back = Status::read(d.path()).unwrap();
    assert_eq!(back, s);
    assert!(back.render(10).contains("channel         stable"));
    let e = Status::read(&d.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("no status yet"));
}
