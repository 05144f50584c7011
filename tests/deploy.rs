//! The compose stack, the images, `.env.example` and the README must not drift from the code.
//! No Docker engine runs here, so these read the files and compare them with what the binaries
//! themselves say they read (`--help` lists every environment variable).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Environment variables a binary reads, from its own `--help` (clap's `[env: NAME=...]`).
fn env_vars(bin: &str, subcommand: Option<&str>) -> BTreeSet<String> {
    let mut c = std::process::Command::new(common::bin(bin));
    if let Some(s) = subcommand {
        c.arg(s);
    }
    let out = c.arg("--help").output().expect("--help runs");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let mut vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect();
    // Read by the logging set-up rather than by clap.
    vars.extend(["RUST_LOG".to_string(), "LOG_FORMAT".to_string()]);
    vars
}

/// The lines of one service's block in docker-compose.yml.
fn service(compose: &str, name: &str) -> String {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|l| *l != header);
    let mut block = String::new();
    if let Some(first) = lines.next() {
        block.push_str(first);
    }
    for l in lines {
        if l.starts_with("  ") && !l.starts_with("   ") && !l.trim_start().starts_with('#')
            || (!l.is_empty() && !l.starts_with(' ') && !l.starts_with('#'))
        {
            break;
        }
        block.push_str(l);
        block.push('\n');
    }
    assert!(!block.is_empty(), "no service {name} in docker-compose.yml");
    block
}

#[test]
fn every_variable_the_binaries_read_is_documented_and_passed_by_compose() {
    let (readme, example, compose) = (
        read("README.md"),
        read(".env.example"),
        read("docker-compose.yml"),
    );
    let producer = env_vars("ticket-producer", None);
    let processor = env_vars("ticket-processor", None);
    assert!(
        producer.contains("NB_TICKETS") && processor.contains("S3_BUCKET_NAME"),
        "help parsing broke: {producer:?}"
    );
    let producer_svc = service(&compose, "ticket-producer");
    let processor_svc = service(&compose, "ticket-processor");
    let anchor = compose
        .split("x-kafka-env:")
        .nth(1)
        .and_then(|s| s.split("\n\n").next())
        .unwrap_or_default();
    for (vars, svc, name) in [
        (&producer, &producer_svc, "ticket-producer"),
        (&processor, &processor_svc, "ticket-processor"),
    ] {
        for v in vars {
            assert!(
                readme.contains(&format!("`{v}`")),
                "README's configuration table lacks {v} ({name} reads it)"
            );
            assert!(
                example
                    .lines()
                    .any(|l| l.trim_start_matches('#').starts_with(&format!("{v}="))),
                ".env.example lacks {v} ({name} reads it)"
            );
            let passed = svc.contains(&format!(" {v}:")) || anchor.contains(&format!(" {v}:"));
            let compose_only_with_aws = v.starts_with("AWS_") && svc.contains(&format!(" {v}:"));
            assert!(
                passed || compose_only_with_aws,
                "docker-compose.yml does not pass {v} to {name}"
            );
        }
    }
}

#[test]
fn images_are_pinned_start_is_health_gated_and_nothing_sleeps() {
    let compose = read("docker-compose.yml");
    for line in compose
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("image:"))
    {
        let image = line.trim_start_matches("image:").trim();
        if image.starts_with("ticket-pipeline/") {
            continue; // built here
        }
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "image {image} is not pinned to a version"
        );
    }
    for df in ["Dockerfile.producer", "Dockerfile.processor"] {
        for line in read(df).lines().filter(|l| l.starts_with("FROM ")) {
            let image = line.split_whitespace().nth(1).expect("FROM image");
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{df}: base image {image} is not pinned"
            );
        }
    }
    assert!(
        !compose
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("sleep ")),
        "compose orders services with sleep"
    );
    let depends = compose.matches("depends_on:").count();
    let conditions = compose.matches("condition: service_").count();
    assert!(
        depends > 0 && conditions >= depends,
        "every depends_on must wait on a health or completion condition"
    );
    for svc in ["redpanda", "minio"] {
        assert!(
            service(&compose, svc).contains("healthcheck:"),
            "{svc} has no health check"
        );
    }
    let processor = service(&compose, "ticket-processor");
    assert!(
        processor.contains("condition: service_completed_successfully"),
        "processor must wait for the topic and bucket jobs"
    );
    assert!(
        !processor.contains("container_name") && !processor.contains("ports:"),
        "fixed names or host ports break --scale ticket-processor=3"
    );
}

#[test]
fn no_secret_reaches_an_image_and_images_run_unprivileged() {
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == ".env"),
        ".dockerignore must exclude .env"
    );
    for df in ["Dockerfile.producer", "Dockerfile.processor"] {
        let text = read(df);
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains(".env"),
                "{df} copies or mentions .env: {line}"
            );
            let upper = line.to_uppercase();
            if upper.trim_start().starts_with("ENV ") || upper.trim_start().starts_with("ARG ") {
                for secret in ["PASSWORD", "SECRET", "ACCESS_KEY"] {
                    assert!(
                        !upper.contains(secret),
                        "{df} bakes a secret into the image: {line}"
                    );
                }
            }
        }
        let user = text
            .lines()
            .rev()
            .find(|l| l.starts_with("USER "))
            .expect("a USER line");
        assert!(
            !user.contains("root") && !user.ends_with(" 0"),
            "{df} runs as root"
        );
        assert!(
            text.contains("AS builder") && text.contains("AS runtime"),
            "{df} is not multi-stage"
        );
    }
    // The HEALTHCHECK calls a subcommand that must exist.
    let hc = read("Dockerfile.processor");
    assert!(
        hc.contains("health-check"),
        "processor image has no HEALTHCHECK via health-check"
    );
    let out = std::process::Command::new(common::bin("ticket-processor"))
        .args(["health-check", "--help"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "ticket-processor health-check does not exist"
    );
}

#[test]
fn the_readme_gives_the_two_commands_and_ci_runs_the_test_one() {
    let readme = read("README.md");
    assert!(readme.contains("docker compose up -d --build"));
    assert!(readme.contains("tests/run.sh"));
    assert!(
        read(".ci/run").contains("./tests/run.sh"),
        ".ci/run must run the README's test command"
    );
}
