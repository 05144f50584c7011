//! The lake's report page, `reports/index.html`: one self-contained HTML file.
//!
//! A data engineer opens it from the MinIO console or as a local file, often on a machine
//! with no way out, so the page fetches nothing: the CSS is inline, the charts are inline SVG
//! drawn here, there is no JavaScript, font, image or link. Hover tooltips are SVG `<title>`s.
//! The caller queries the lake and passes the results, and the time, in [`ReportData`];
//! [`render`] is a pure function of it. The markup is maud's `html!`: it is checked when this
//! crate compiles, and every value spliced into it (team names, the title, the source: any
//! text) is escaped there, so no function here writes or escapes HTML by hand.
//!
//! Under each chart the same numbers stand in an HTML table, for screen readers and for tests
//! that read the rendered DOM (`chromium --headless --dump-dom`) and compare it with SQL:
//!
//! - per hour: `<tr data-hour=H>` rows of `<td data-hour=H data-request-type=T data-count=N>`;
//! - load: `<tr data-team=X>` rows of `<td data-team=X data-priority=P data-count=N>`;
//! - totals: elements with `data-total="tickets" | "dead_letters" | "hours"` and the plain
//!   value in `data-value` (`unknown` when the dead letters could not be counted).
//!
//! `data-count` holds the plain integer (the text may read `12,345`). There is exactly one such
//! cell per input group (rows with the same key are summed) and none for a group missing from
//! the input; row and column sums carry `data-sum` instead, so `td[data-count]` is the SQL
//! result and nothing else.

use std::collections::{BTreeMap, BTreeSet};

use maud::{DOCTYPE, Markup, PreEscaped, html};

/// Valid tickets of one request type in one hour bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourTypeCount {
    /// The hour bucket as displayed, e.g. `2026-11-29 08:00`. Hours are sorted as strings, so
    /// pass a zero-padded, most significant first form. A space splits the axis label in two
    /// lines (time above date).
    pub hour: String,
    pub request_type: String,
    pub count: u64,
}

/// Valid tickets of one priority routed to one support team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamPriorityCount {
    /// The team name, from the routing file: any text, escaped on the page.
    pub team: String,
    /// `low`, `medium`, `high`, `urgent` come first, in that order; any other value follows,
    /// sorted.
    pub priority: String,
    pub count: u64,
}

/// Everything the page shows.
///
/// `per_hour` and `load` are the same valid tickets grouped two ways; the tickets total on the
/// page is the sum of `load` (a note appears if the sum of `per_hour` differs, e.g. when the
/// two queries saw different files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportData {
    /// The page's `<title>` and heading.
    pub title: String,
    /// Where the numbers were read, free text, e.g. `s3://tickets/prod/ via http://minio:9000`.
    /// Shown as text, never as a link.
    pub source: String,
    /// When the report was made, already formatted in UTC, e.g. `2026-11-29 10:15:02 UTC`
    /// (passed in: this crate reads no clock).
    pub generated_at: String,
    /// Messages on the dead-letter topic; `None` when they could not be counted ("unknown").
    pub dead_letters: Option<u64>,
    pub per_hour: Vec<HourTypeCount>,
    pub load: Vec<TeamPriorityCount>,
    /// Tickets in `load` that have no hour (objects written before time partitions, or a
    /// `process-file` directory of an earlier version): counted in the totals, not in `per_hour`.
    pub undated: u64,
}

/// The page for `data`: a complete HTML document that needs nothing else to display.
pub fn render(data: &ReportData) -> String {
    page(data, &per_hour_grid(&data.per_hour), &load_grid(&data.load)).into_string()
}

// ---------------------------------------------------------------------------------------------
// The numbers, arranged for display.

/// Counts in rows and columns, each in display order: hours by request type, or teams by
/// priority.
struct Grid {
    rows: Vec<String>,
    cols: Vec<String>,
    /// `cells[row][col]`, `None` where the input had no such group.
    cells: Vec<Vec<Option<u64>>>,
}

type Groups = BTreeMap<(String, String), u64>;

impl Grid {
    fn new(groups: &Groups, rows: Vec<String>, cols: Vec<String>) -> Grid {
        let cells = rows
            .iter()
            .map(|r| {
                cols.iter()
                    .map(|c| groups.get(&(r.clone(), c.clone())).copied())
                    .collect()
            })
            .collect();
        Grid { rows, cols, cells }
    }

    fn row_total(&self, row: usize) -> u64 {
        self.cells[row].iter().flatten().sum()
    }

    fn col_total(&self, col: usize) -> u64 {
        self.cells.iter().filter_map(|r| r[col]).sum()
    }

    fn total(&self) -> u64 {
        (0..self.rows.len()).map(|r| self.row_total(r)).sum()
    }

    fn max_row_total(&self) -> u64 {
        (0..self.rows.len())
            .map(|r| self.row_total(r))
            .max()
            .unwrap_or(0)
    }
}

/// Sums the counts by (row key, column key): the input may repeat a group.
fn sum_groups<'a>(items: impl Iterator<Item = (&'a str, &'a str, u64)>) -> Groups {
    let mut groups = Groups::new();
    for (row, col, count) in items {
        *groups.entry((row.to_owned(), col.to_owned())).or_default() += count;
    }
    groups
}

/// Hours ascending by rows, request types sorted by name across.
fn per_hour_grid(rows: &[HourTypeCount]) -> Grid {
    let groups = sum_groups(
        rows.iter()
            .map(|r| (r.hour.as_str(), r.request_type.as_str(), r.count)),
    );
    let hours = distinct(groups.keys().map(|(h, _)| h));
    let types = distinct(groups.keys().map(|(_, t)| t));
    Grid::new(&groups, hours, types)
}

/// Busiest team first (ties by name), priorities in [`priority_order`].
fn load_grid(rows: &[TeamPriorityCount]) -> Grid {
    let groups = sum_groups(
        rows.iter()
            .map(|r| (r.team.as_str(), r.priority.as_str(), r.count)),
    );
    let mut team_totals: BTreeMap<&str, u64> = BTreeMap::new();
    for ((team, _), count) in &groups {
        *team_totals.entry(team).or_default() += count;
    }
    let mut teams = distinct(groups.keys().map(|(t, _)| t));
    // Stable: teams with the same load stay in name order.
    teams.sort_by_key(|t| std::cmp::Reverse(team_totals.get(t.as_str()).copied()));
    let mut priorities = distinct(groups.keys().map(|(_, p)| p));
    priorities.sort_by_key(|p| priority_order(p));
    Grid::new(&groups, teams, priorities)
}

/// The distinct values, sorted.
fn distinct<'a>(values: impl Iterator<Item = &'a String>) -> Vec<String> {
    values
        .collect::<BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect()
}

/// The priorities the pipeline knows, least urgent first.
const KNOWN_PRIORITIES: [&str; 4] = ["low", "medium", "high", "urgent"];

/// Sort key: a known priority by its rank, then any other one (stable sort keeps those in
/// name order).
fn priority_order(priority: &str) -> usize {
    KNOWN_PRIORITIES
        .iter()
        .position(|p| *p == priority)
        .unwrap_or(KNOWN_PRIORITIES.len())
}

// ---------------------------------------------------------------------------------------------
// Colours.

/// Request types, assigned in sorted name order (Tableau 10): a type keeps its colour as long
/// as the set of types does.
const TYPE_PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// `low`, `medium`, `high`, `urgent`: cool to hot.
const PRIORITY_PALETTE: [&str; 4] = ["#8fb8de", "#f2c14e", "#ee7b30", "#c8312b"];

/// Priorities the pipeline does not know, in sorted order.
const OTHER_PRIORITY_PALETTE: [&str; 4] = ["#8e6bb0", "#5aa39a", "#9c755f", "#7f7f7f"];

/// One colour per request type; `types` is sorted, as [`per_hour_grid`] makes it.
fn type_colours(types: &[String]) -> Vec<&'static str> {
    (0..types.len())
        .map(|i| TYPE_PALETTE[i % TYPE_PALETTE.len()])
        .collect()
}

/// One colour per priority; `priorities` is in [`priority_order`].
fn priority_colours(priorities: &[String]) -> Vec<&'static str> {
    let mut others = 0;
    priorities
        .iter()
        .map(|p| match KNOWN_PRIORITIES.iter().position(|k| k == p) {
            Some(i) => PRIORITY_PALETTE[i],
            None => {
                others += 1;
                OTHER_PRIORITY_PALETTE[(others - 1) % OTHER_PRIORITY_PALETTE.len()]
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Text. Everything spliced into the markup (`(value)`) is escaped by maud; only the style sheet
// goes in as it is.

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// At most `max` characters, the last one `…` when something was cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// A coordinate with one decimal.
fn c1(x: f64) -> String {
    format!("{x:.1}")
}

/// A coordinate with two decimals.
fn c2(x: f64) -> String {
    format!("{x:.2}")
}

// ---------------------------------------------------------------------------------------------
// Page and sections.

fn page(data: &ReportData, per_hour: &Grid, load: &Grid) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (data.title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                main {
                    header {
                        h1 { (data.title) }
                        p class="meta" {
                            "Source " code { (data.source) } " · generated " (data.generated_at)
                        }
                    }
                    (totals(data, per_hour, load))
                    @if per_hour.total() == 0 && load.total() == 0 {
                        (empty_state())
                    } @else {
                        (consistency_note(per_hour.total() + data.undated, load.total()))
                        (undated_note(data.undated))
                        (section(&PER_HOUR, per_hour, &type_colours(&per_hour.cols)))
                        (section(&LOAD, load, &priority_colours(&load.cols)))
                    }
                }
            }
        }
    }
}

fn totals(data: &ReportData, per_hour: &Grid, load: &Grid) -> Markup {
    let hours = per_hour.rows.len() as u64;
    let span = match (per_hour.rows.first(), per_hour.rows.last()) {
        (Some(first), Some(last)) if first != last => format!("{first} – {last}"),
        (Some(only), _) => only.clone(),
        _ => String::new(),
    };
    let dead_letters_note = if data.dead_letters.is_some() {
        ""
    } else {
        "not counted"
    };
    html! {
        section class="totals" aria-label="Totals" {
            (stat("tickets", Some(load.total()), "tickets", "valid, written to the lake"))
            (stat("dead_letters", data.dead_letters, "dead letters", dead_letters_note))
            (stat("hours", Some(hours), "hours covered", &span))
        }
    }
}

/// One figure of the totals: `data-value` holds the plain number, or `unknown`.
fn stat(key: &str, value: Option<u64>, label: &str, note: &str) -> Markup {
    let (plain, shown) = match value {
        Some(n) => (n.to_string(), thousands(n)),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    };
    html! {
        div class="stat" data-total=(key) data-value=(plain) {
            div class="stat-value" { (shown) }
            div class="stat-label" { (label) }
            div class="stat-note" { (note) }
        }
    }
}

fn empty_state() -> Markup {
    html! {
        section class="card empty" {
            h2 { "No tickets yet" }
            p {
                "The lake holds no valid tickets at this source. Once the processor has written "
                "a batch, the next report shows them per hour and per team."
            }
        }
    }
}

/// Why some tickets are in the totals but not in the hours.
fn undated_note(undated: u64) -> Markup {
    html! {
        @if undated > 0 {
            p class="note" role="note" data-undated=(undated) {
                (thousands(undated)) " tickets have no hour (written before time partitions, or "
                "by an earlier version of process-file): they are in the totals and the load per "
                "team, not in the tickets per hour."
            }
        }
    }
}

/// A visible note when the two groupings disagree on the number of tickets.
fn consistency_note(per_hour_total: u64, load_total: u64) -> Markup {
    html! {
        @if per_hour_total != load_total {
            p class="warn" role="note" {
                "The tickets per hour add up to " (thousands(per_hour_total)) ", the load per "
                "team to " (thousands(load_total)) ": the two queries did not see the same "
                "tickets (files written in between?)."
            }
        }
    }
}

/// One of the two groupings: its section, chart and table, and the `data-*` attributes its
/// cells carry (see the module doc).
struct Grouping {
    id: &'static str,
    caption: &'static str,
    row_heading: &'static str,
    /// Rows are hours and columns request types (`data-hour`, `data-request-type`); otherwise
    /// rows are teams and columns priorities (`data-team`, `data-priority`).
    by_hour: bool,
}

const PER_HOUR: Grouping = Grouping {
    id: "per-hour",
    caption: "Tickets per hour by request type",
    row_heading: "Hour",
    by_hour: true,
};

const LOAD: Grouping = Grouping {
    id: "load",
    caption: "Load per team and priority",
    row_heading: "Team",
    by_hour: false,
};

impl Grouping {
    /// `value` for the attribute of this grouping's kind, `None` (no attribute) for the other's.
    fn hour<'a>(&self, value: &'a str) -> Option<&'a str> {
        self.by_hour.then_some(value)
    }

    fn team<'a>(&self, value: &'a str) -> Option<&'a str> {
        (!self.by_hour).then_some(value)
    }

    fn chart(&self, grid: &Grid, colours: &[&str]) -> Markup {
        if self.by_hour {
            hourly_chart(grid, colours)
        } else {
            load_chart(grid, colours)
        }
    }
}

fn section(g: &Grouping, grid: &Grid, colours: &[&str]) -> Markup {
    let title_id = format!("{}-title", g.id);
    html! {
        @if grid.total() == 0 {
            section class="card" id=(g.id) {
                h2 id=(title_id) { (g.caption) }
                p class="empty-note" { "No tickets in this grouping." }
            }
        } @else {
            section class="card" id=(g.id) aria-labelledby=(title_id) {
                h2 id=(title_id) { (g.caption) }
                (legend(&grid.cols, colours))
                (g.chart(grid, colours))
                (numbers_table(g, grid, colours))
            }
        }
    }
}

fn legend(names: &[String], colours: &[&str]) -> Markup {
    html! {
        ul class="legend" aria-label="Legend" {
            @for (name, colour) in names.iter().zip(colours) {
                li { (swatch(colour)) (name) }
            }
        }
    }
}

fn swatch(colour: &str) -> Markup {
    html! { span class="swatch" style={ "background:" (colour) } {} }
}

// ---------------------------------------------------------------------------------------------
// Tables.

fn numbers_table(g: &Grouping, grid: &Grid, colours: &[&str]) -> Markup {
    html! {
        div class="table-wrap" role="region" aria-label={ (g.caption) ", numbers" } tabindex="0" {
            table id={ (g.id) "-table" } {
                caption { (g.caption) ": the numbers" }
                thead {
                    tr {
                        th scope="col" { (g.row_heading) }
                        @for (col, colour) in grid.cols.iter().zip(colours) {
                            th scope="col" data-request-type=[g.hour(col)] data-priority=[g.team(col)] {
                                (swatch(colour)) (col)
                            }
                        }
                        th scope="col" { "Total" }
                    }
                }
                tbody {
                    @for r in 0..grid.rows.len() {
                        (table_row(g, grid, r))
                    }
                }
                tfoot {
                    tr {
                        th scope="row" { "Total" }
                        @for c in 0..grid.cols.len() {
                            (sum_cell(grid.col_total(c)))
                        }
                        (sum_cell(grid.total()))
                    }
                }
            }
        }
    }
}

fn table_row(g: &Grouping, grid: &Grid, r: usize) -> Markup {
    let key = grid.rows[r].as_str();
    html! {
        tr data-hour=[g.hour(key)] data-team=[g.team(key)] {
            th scope="row" { (key) }
            @for (col, cell) in grid.cols.iter().zip(&grid.cells[r]) {
                @if let Some(n) = cell {
                    td data-hour=[g.hour(key)] data-team=[g.team(key)]
                        data-request-type=[g.hour(col)] data-priority=[g.team(col)]
                        data-count=(n) { (thousands(*n)) }
                } @else {
                    td class="none" title="none" { "–" }
                }
            }
            (sum_cell(grid.row_total(r)))
        }
    }
}

/// A row or column sum: `data-sum`, never `data-count` (see the module doc).
fn sum_cell(n: u64) -> Markup {
    html! { td class="sum" data-sum=(n) { (thousands(n)) } }
}

// ---------------------------------------------------------------------------------------------
// Charts: inline SVG in a 1000-unit-wide view box that scales to the page width. SVG elements
// are written with an end tag (`<line ...></line>`): in HTML a `<line>` left open would hold
// every element after it.

const CHART_WIDTH: f64 = 1000.0;

/// An axis from 0 to `top` in steps of `step`, both round numbers.
struct Scale {
    step: u64,
    top: u64,
}

impl Scale {
    /// About `ticks` steps of 1, 2 or 5 times a power of ten, covering `max`.
    fn new(max: u64, ticks: u64) -> Scale {
        let mut magnitude: u64 = 1;
        loop {
            for m in [1, 2, 5] {
                let step = magnitude.saturating_mul(m);
                if max.div_ceil(step) <= ticks || step == u64::MAX {
                    let top = max.div_ceil(step).max(1).saturating_mul(step);
                    return Scale { step, top };
                }
            }
            magnitude = magnitude.saturating_mul(10);
        }
    }

    fn values(&self) -> impl Iterator<Item = u64> + '_ {
        (0..=self.top / self.step).map(|i| i * self.step)
    }

    /// `n` as a length on an axis `length` long.
    fn length(&self, n: u64, length: f64) -> f64 {
        n as f64 / self.top as f64 * length
    }
}

/// Label every `n`th hour, `n` a divisor or multiple of a day, so at most `max_labels` show.
fn label_every(hours: usize, max_labels: usize) -> usize {
    let needed = hours.div_ceil(max_labels.max(1)).max(1);
    [1, 2, 3, 4, 6, 12]
        .into_iter()
        .find(|n| *n >= needed)
        .unwrap_or_else(|| needed.div_ceil(24) * 24)
}

/// One segment of row `r`'s stacked bar, for each column with tickets.
struct Segment<'a> {
    /// Tickets of the row in the segments before this one.
    before: u64,
    count: u64,
    col: &'a str,
    colour: &'a str,
}

fn stack<'a>(grid: &'a Grid, r: usize, colours: &[&'a str]) -> Vec<Segment<'a>> {
    let mut before = 0;
    let mut segments = vec![];
    for ((col, cell), colour) in grid.cols.iter().zip(&grid.cells[r]).zip(colours) {
        let count = cell.unwrap_or(0);
        if count > 0 {
            segments.push(Segment {
                before,
                count,
                col,
                colour,
            });
            before += count;
        }
    }
    segments
}

/// A bar segment, with its row, column and count as the hover tooltip.
fn rect(x: f64, y: f64, width: f64, height: f64, row: &str, segment: &Segment) -> Markup {
    html! {
        rect class="seg" x=(c2(x)) y=(c2(y)) width=(c2(width)) height=(c2(height)) fill=(segment.colour) {
            title { (row) " · " (segment.col) ": " (thousands(segment.count)) }
        }
    }
}

/// Stacked vertical bars: one bar per hour, one segment per request type with tickets.
fn hourly_chart(grid: &Grid, colours: &[&str]) -> Markup {
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 12.0;
    const TOP: f64 = 14.0;
    const PLOT_HEIGHT: f64 = 280.0;
    const BOTTOM: f64 = 46.0;
    let plot_width = CHART_WIDTH - LEFT - RIGHT;
    let base = TOP + PLOT_HEIGHT;
    let scale = Scale::new(grid.max_row_total(), 5);
    let band = plot_width / grid.rows.len().max(1) as f64;
    let bar_width = (band * 0.78).min(56.0);
    let centre = |r: usize| LEFT + band * (r as f64 + 0.5);
    let every = label_every(grid.rows.len(), (plot_width / 84.0) as usize);
    // (row, time, date): a date shows under the first label of its day.
    let mut last_date = None;
    let mut labels = vec![];
    for (r, hour) in grid.rows.iter().enumerate().step_by(every) {
        let (date, time) = split_hour(hour);
        labels.push((r, time, date.filter(|d| last_date != Some(*d))));
        last_date = date;
    }
    let content = html! {
        @for v in scale.values() {
            @let y = base - scale.length(v, PLOT_HEIGHT);
            line class="grid" x1=(LEFT) x2=(c1(CHART_WIDTH - RIGHT)) y1=(c1(y)) y2=(c1(y)) {}
            text class="tick" x=(c1(LEFT - 8.0)) y=(c1(y + 4.0)) text-anchor="end" {
                (thousands(v))
            }
        }
        @for (r, hour) in grid.rows.iter().enumerate() {
            @for s in stack(grid, r, colours) {
                (rect(
                    centre(r) - bar_width / 2.0,
                    base - scale.length(s.before + s.count, PLOT_HEIGHT),
                    bar_width,
                    scale.length(s.count, PLOT_HEIGHT),
                    hour,
                    &s,
                ))
            }
        }
        @for (r, time, date) in labels {
            @let x = c1(centre(r));
            line class="axis" x1=(x) x2=(x) y1=(base) y2=(c1(base + 5.0)) {}
            text class="tick xlabel" x=(x) y=(c1(base + 18.0)) text-anchor="middle" {
                tspan x=(x) dy="0" { (time) }
                @if let Some(date) = date {
                    tspan class="date" x=(x) dy="14" { (date) }
                }
            }
        }
        line class="axis" x1=(LEFT) x2=(c1(CHART_WIDTH - RIGHT)) y1=(base) y2=(base) {}
    };
    svg(
        "per-hour-chart",
        "Tickets per hour, stacked by request type",
        base + BOTTOM,
        content,
    )
}

/// `2026-11-29 08:00` as (`2026-11-29`, `08:00`); an hour without a space has no date.
fn split_hour(hour: &str) -> (Option<&str>, &str) {
    match hour.split_once(' ') {
        Some((date, time)) => (Some(date), time),
        None => (None, hour),
    }
}

/// Stacked horizontal bars: one bar per team, one segment per priority with tickets.
fn load_chart(grid: &Grid, colours: &[&str]) -> Markup {
    const MAX_NAME: usize = 30;
    const RIGHT: f64 = 70.0;
    const TOP: f64 = 8.0;
    const ROW: f64 = 32.0;
    const BAR: f64 = 20.0;
    const BOTTOM: f64 = 28.0;
    let longest = grid
        .rows
        .iter()
        .map(|t| t.chars().count().min(MAX_NAME))
        .max()
        .unwrap_or(0);
    let left = (longest as f64 * 7.4 + 16.0).clamp(80.0, 250.0);
    let plot_width = CHART_WIDTH - left - RIGHT;
    let base = TOP + ROW * grid.rows.len() as f64;
    let scale = Scale::new(grid.max_row_total(), 6);
    let bar_top = |r: usize| TOP + ROW * r as f64 + (ROW - BAR) / 2.0;
    let text_y = |r: usize| c1(bar_top(r) + BAR / 2.0 + 4.5);
    let content = html! {
        @for v in scale.values() {
            @let x = c1(left + scale.length(v, plot_width));
            line class="grid" x1=(x) x2=(x) y1=(TOP) y2=(c1(base)) {}
            text class="tick" x=(x) y=(c1(base + 18.0)) text-anchor="middle" { (thousands(v)) }
        }
        @for (r, team) in grid.rows.iter().enumerate() {
            text class="label" x=(c1(left - 10.0)) y=(text_y(r)) text-anchor="end" {
                (truncate(team, MAX_NAME))
                title { (team) }
            }
            @for s in stack(grid, r, colours) {
                (rect(
                    left + scale.length(s.before, plot_width),
                    bar_top(r),
                    scale.length(s.count, plot_width),
                    BAR,
                    team,
                    &s,
                ))
            }
            text class="value" x=(c1(left + scale.length(grid.row_total(r), plot_width) + 6.0)) y=(text_y(r)) {
                (thousands(grid.row_total(r)))
            }
        }
        line class="axis" x1=(c1(left)) x2=(c1(left)) y1=(TOP) y2=(c1(base)) {}
    };
    svg(
        "load-chart",
        "Tickets per support team, stacked by priority",
        base + BOTTOM,
        content,
    )
}

/// An inline `<svg>` (no `xmlns`: the HTML parser places it, and it would be the page's only
/// URL).
fn svg(id: &str, title: &str, height: f64, content: Markup) -> Markup {
    html! {
        svg id=(id) class="chart" viewBox={ "0 0 " (CHART_WIDTH) " " (format!("{height:.0}")) }
            role="img" aria-label=(title) {
            title { (title) }
            (content)
        }
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 18px; margin: 0 0 10px; }
.meta { color: var(--muted); margin: 0 0 20px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #e9edf2;
  padding: 1px 6px; border-radius: 4px; overflow-wrap: anywhere; }
.totals { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 14px; margin-bottom: 20px; }
.stat, .card { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  box-shadow: 0 1px 2px rgba(31, 41, 51, 0.05); }
.stat { padding: 14px 18px; }
.stat-value { font-size: 30px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stat-label { font-weight: 600; }
.stat-note { color: var(--muted); font-size: 13px; min-height: 1.2em; }
.card { padding: 20px 22px; margin-bottom: 20px; }
.empty { text-align: center; padding: 48px 22px; }
.empty h2 { font-size: 24px; }
.empty p, .empty-note { color: var(--muted); }
.warn { background: #fff4e5; border: 1px solid #f5c37a; border-radius: 8px; padding: 10px 14px; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 6px 18px; padding: 0; margin: 0 0 8px; font-size: 14px; }
.legend li { display: flex; align-items: center; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 6px; flex: none; }
.chart { display: block; width: 100%; height: auto; margin: 4px 0 14px; }
.chart text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--muted); }
.chart .label { font-size: 13px; fill: var(--ink); }
.chart .date { font-weight: 600; fill: var(--ink); }
.chart .value { font-weight: 600; fill: var(--ink); }
.chart .grid { stroke: var(--line); }
.chart .axis { stroke: #9aa5b1; }
.chart .seg { stroke: #fff; stroke-width: 0.5; }
.table-wrap { max-height: 360px; overflow: auto; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
caption { text-align: left; padding: 8px 12px; color: var(--muted); font-size: 13px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); white-space: nowrap; }
td { text-align: right; }
th { text-align: left; font-weight: 600; }
tbody th { font-weight: 500; }
thead th { position: sticky; top: 0; background: #f0f3f7; }
thead th:not(:first-child) { text-align: right; }
tbody tr:hover { background: #f7f9fc; }
td.none { color: #b6bec8; }
td.sum, tfoot td { font-weight: 600; }
tfoot th, tfoot td { background: #f0f3f7; border-bottom: 0; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(hour: &str, request_type: &str, count: u64) -> HourTypeCount {
        HourTypeCount {
            hour: hour.into(),
            request_type: request_type.into(),
            count,
        }
    }

    fn load(team: &str, priority: &str, count: u64) -> TeamPriorityCount {
        TeamPriorityCount {
            team: team.into(),
            priority: priority.into(),
            count,
        }
    }

    /// Three hours out of order, one group with no tickets, a team name full of markup.
    fn sample() -> ReportData {
        ReportData {
            title: "Tickets <lake>".into(),
            source: "s3://tickets/prod/ via minio:9000".into(),
            generated_at: "2026-11-29 10:15:02 UTC".into(),
            dead_letters: Some(7),
            per_hour: vec![
                hour("2026-11-29 09:00", "technical", 4),
                hour("2026-11-29 08:00", "billing", 1200),
                hour("2026-11-28 23:00", "billing", 3),
                hour("2026-11-29 08:00", "technical", 5),
                hour("2026-11-29 09:00", "billing", 0),
            ],
            load: vec![
                load("Billing Team", "high", 1000),
                load("Billing Team", "low", 203),
                load(r#"<b>&"x"</b>"#, "urgent", 9),
            ],
            undated: 0,
        }
    }

    #[test]
    fn tickets_without_an_hour_are_explained_not_flagged() {
        let mut data = sample();
        let hours: u64 = data.per_hour.iter().map(|h| h.count).sum();
        data.load.push(load("Billing Team", "medium", 40));
        data.undated = data.load.iter().map(|l| l.count).sum::<u64>() - hours;
        let page = render(&data);
        assert!(page.contains(&format!(r#"data-undated="{}""#, data.undated)));
        assert!(!page.contains("did not see the same tickets"));
        data.undated = 0;
        assert!(render(&data).contains("did not see the same tickets"));
    }

    /// The attributes of every `<{tag} ...>` start tag that has `attr`, in page order.
    fn tags_with(page: &str, tag: &str, attr: &str) -> Vec<BTreeMap<String, String>> {
        page.split(&format!("<{tag} "))
            .skip(1)
            .filter_map(|rest| rest.split_once('>').map(|(attrs, _)| attributes(attrs)))
            .filter(|attrs| attrs.contains_key(attr))
            .collect()
    }

    /// `a="1" b="x y"` as a map; values stay escaped.
    fn attributes(text: &str) -> BTreeMap<String, String> {
        text.split('"')
            .collect::<Vec<_>>()
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| {
                let name = pair[0].trim().trim_end_matches('=');
                (name.to_owned(), pair[1].to_owned())
            })
            .collect()
    }

    /// The `<svg id="{id}"> ... </svg>` element.
    fn svg_of<'a>(page: &'a str, id: &str) -> &'a str {
        let start = page
            .find(&format!(r#"<svg id="{id}""#))
            .expect("the chart is on the page");
        let len = page[start..].find("</svg>").expect("the chart is closed");
        &page[start..start + len]
    }

    #[test]
    fn text_from_the_inputs_is_escaped() {
        let page = render(&sample());
        assert!(!page.contains("<b>"), "raw markup from a team name");
        assert!(!page.contains(r#"&"x""#), "raw quote or ampersand");
        assert!(!page.contains("<lake>"), "raw markup from the title");
        let escaped = "&lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;";
        assert!(page.contains(&format!(r#"<tr data-team="{escaped}">"#)));
        assert!(page.contains(&format!(r#"<th scope="row">{escaped}</th>"#)));
        assert!(page.contains("<title>Tickets &lt;lake&gt;</title>"));
    }

    #[test]
    fn the_page_fetches_nothing() {
        for source in ["s3://tickets/prod/", "s3://tickets/ via http://minio:9000"] {
            let data = ReportData {
                source: source.into(),
                ..sample()
            };
            let page = render(&data);
            let escaped = html! { (source) }.into_string();
            assert!(page.contains(&format!("<code>{escaped}</code>")));
            // The source is the caller's text, shown as text: check everything else.
            let template = page.replace(&escaped, "");
            for needle in [
                "http://", "https://", "src=", "<script", "href", "url(", "@import", "<link",
                "<img", "<iframe", "xmlns",
            ] {
                assert!(!template.contains(needle), "{needle:?} on the page");
            }
        }
    }

    #[test]
    fn every_svg_element_is_closed() {
        // `line x1=..;` (maud's void syntax) would print `<line ...>` with no end tag, and in
        // HTML everything after it would land inside the line, out of sight.
        let page = render(&sample());
        for tag in ["line", "rect", "text", "tspan", "title"] {
            let opened = page.matches(&format!("<{tag} ")).count()
                + page.matches(&format!("<{tag}>")).count();
            let closed = page.matches(&format!("</{tag}>")).count();
            assert!(opened > 0, "no <{tag}> on the page");
            assert_eq!(
                opened, closed,
                "<{tag}> opened {opened} times, closed {closed}"
            );
        }
    }

    #[test]
    fn count_cells_hold_the_input_numbers() {
        let data = sample();
        let page = render(&data);
        let hours: BTreeMap<(String, String), String> = tags_with(&page, "td", "data-count")
            .into_iter()
            .filter(|a| a.contains_key("data-hour"))
            .map(|a| {
                (
                    (a["data-hour"].clone(), a["data-request-type"].clone()),
                    a["data-count"].clone(),
                )
            })
            .collect();
        let expected: BTreeMap<(String, String), String> = data
            .per_hour
            .iter()
            .map(|r| {
                (
                    (r.hour.clone(), r.request_type.clone()),
                    r.count.to_string(),
                )
            })
            .collect();
        assert_eq!(hours, expected);
        // The display text has separators, the attribute does not.
        assert!(page.contains(r#"data-count="1200">1,200</td>"#));

        let teams: Vec<(String, String, String)> = tags_with(&page, "td", "data-team")
            .into_iter()
            .map(|a| {
                (
                    a["data-team"].clone(),
                    a["data-priority"].clone(),
                    a["data-count"].clone(),
                )
            })
            .collect();
        assert_eq!(
            teams,
            [
                ("Billing Team", "low", "203"),
                ("Billing Team", "high", "1000"),
                ("&lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;", "urgent", "9"),
            ]
            .map(|(t, p, c)| (t.to_owned(), p.to_owned(), c.to_owned()))
        );
        assert_eq!(
            tags_with(&page, "td", "data-count").len(),
            data.per_hour.len() + data.load.len(),
            "a data-count cell that is not an input group"
        );
    }

    #[test]
    fn totals_are_the_sum_of_load_and_the_distinct_hours() {
        let page = render(&sample());
        let totals: BTreeMap<String, String> = tags_with(&page, "div", "data-total")
            .into_iter()
            .map(|a| (a["data-total"].clone(), a["data-value"].clone()))
            .collect();
        let expected = [("dead_letters", "7"), ("hours", "3"), ("tickets", "1212")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(totals, BTreeMap::from(expected));
        assert!(page.contains(">1,212</div>"));
        assert!(!page.contains(r#"class="warn""#));

        // The groupings disagree: the tickets are still the sum of load, and a note says so.
        let page = render(&ReportData {
            per_hour: vec![hour("2026-11-29 08:00", "billing", 1)],
            ..sample()
        });
        assert!(page.contains(r#"data-total="tickets" data-value="1212""#));
        assert!(page.contains(r#"data-total="hours" data-value="1""#));
        assert!(page.contains("The tickets per hour add up to 1, the load per team to 1,212"));
    }

    #[test]
    fn a_group_given_twice_is_summed() {
        let data = ReportData {
            per_hour: vec![hour("h1", "billing", 2), hour("h1", "billing", 3)],
            load: vec![load("T", "low", 2), load("T", "low", 3)],
            ..sample()
        };
        let page = render(&data);
        let counts: Vec<String> = tags_with(&page, "td", "data-count")
            .into_iter()
            .map(|a| a["data-count"].clone())
            .collect();
        assert_eq!(counts, ["5", "5"]);
        assert!(page.contains(r#"data-total="tickets" data-value="5""#));
    }

    #[test]
    fn unknown_dead_letters_say_so() {
        let page = render(&ReportData {
            dead_letters: None,
            ..sample()
        });
        assert!(page.contains(r#"data-total="dead_letters" data-value="unknown""#));
    }

    #[test]
    fn hours_are_sorted_in_table_and_chart() {
        let page = render(&sample());
        let rows: Vec<String> = tags_with(&page, "tr", "data-hour")
            .into_iter()
            .map(|a| a["data-hour"].clone())
            .collect();
        assert_eq!(
            rows,
            ["2026-11-28 23:00", "2026-11-29 08:00", "2026-11-29 09:00"]
        );
        let chart = svg_of(&page, "per-hour-chart");
        let first = chart.find("<title>2026-11-28 23:00");
        let last = chart.find("<title>2026-11-29 09:00");
        assert!(first.is_some() && first < last, "bars out of order");
    }

    #[test]
    fn an_empty_lake_says_no_tickets_yet() {
        let page = render(&ReportData {
            title: "Tickets".into(),
            ..ReportData::default()
        });
        assert!(page.contains("<h2>No tickets yet</h2>"));
        assert!(!page.contains("<svg"), "an empty chart");
        assert!(!page.contains("<table"), "an empty table");
        assert!(page.contains(r#"data-total="tickets" data-value="0""#));
        assert!(page.contains(r#"data-total="hours" data-value="0""#));
        assert!(page.contains(r#"data-total="dead_letters" data-value="unknown""#));
        assert!(!render(&sample()).contains("No tickets yet"));
    }

    #[test]
    fn one_bar_segment_per_group_with_tickets() {
        let page = render(&sample());
        // Five hour groups, one of them with 0 tickets; three team groups.
        assert_eq!(
            svg_of(&page, "per-hour-chart")
                .matches(r#"<rect class="seg""#)
                .count(),
            4
        );
        assert_eq!(
            svg_of(&page, "load-chart")
                .matches(r#"<rect class="seg""#)
                .count(),
            3
        );
    }

    #[test]
    fn segments_of_a_request_type_share_its_colour() {
        let page = render(&sample());
        let chart = svg_of(&page, "per-hour-chart");
        let fills = |request_type: &str| -> BTreeSet<String> {
            chart
                .split("<rect ")
                .skip(1)
                .filter(|rect| rect.contains(&format!(" · {request_type}:")))
                .filter_map(|rect| rect.split_once('>'))
                .map(|(attrs, _)| attributes(attrs)["fill"].clone())
                .collect()
        };
        // Sorted names: billing first, technical second.
        assert_eq!(
            fills("billing"),
            BTreeSet::from([TYPE_PALETTE[0].to_owned()])
        );
        assert_eq!(
            fills("technical"),
            BTreeSet::from([TYPE_PALETTE[1].to_owned()])
        );
    }

    #[test]
    fn known_priorities_come_first_in_their_order() {
        let rows = ["other", "urgent", "low", "critical", "high", "medium"]
            .map(|p| load("T", p, 1))
            .to_vec();
        let grid = load_grid(&rows);
        assert_eq!(
            grid.cols,
            ["low", "medium", "high", "urgent", "critical", "other"]
        );
        let colours = priority_colours(&grid.cols);
        assert_eq!(colours[..4], PRIORITY_PALETTE);
        assert_eq!(colours[4..], OTHER_PRIORITY_PALETTE[..2]);
    }

    #[test]
    fn busiest_team_first() {
        let rows = vec![
            load("A", "low", 1),
            load("B", "low", 5),
            load("C", "high", 1),
        ];
        assert_eq!(load_grid(&rows).rows, ["B", "A", "C"]);
    }

    #[test]
    fn hour_labels_thin_out_with_many_hours() {
        let chart = |hours: usize| {
            let rows: Vec<HourTypeCount> = (0..hours)
                .map(|h| {
                    hour(
                        &format!("2026-11-{:02} {:02}:00", 27 + h / 24, h % 24),
                        "t",
                        1,
                    )
                })
                .collect();
            let page = render(&ReportData {
                per_hour: rows,
                ..sample()
            });
            svg_of(&page, "per-hour-chart").to_owned()
        };
        let labels = |hours: usize| chart(hours).matches("xlabel").count();
        assert_eq!(labels(1), 1);
        assert_eq!(labels(10), 10);
        assert_eq!(labels(72), 6, "every 12 hours");
        assert!(labels(400) <= 11);
        // Three days: each date once, under the first label of its day.
        let three_days = chart(72);
        let dates: Vec<&str> = three_days
            .split(r#"<tspan class="date""#)
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once('<').map(|(d, _)| d))
            .collect();
        assert_eq!(dates, ["2026-11-27", "2026-11-28", "2026-11-29"]);
    }

    #[test]
    fn scales_are_round_and_cover_the_maximum() {
        let s = Scale::new(1212, 5);
        assert_eq!((s.step, s.top), (500, 1500));
        let s = Scale::new(0, 5);
        assert_eq!((s.step, s.top), (1, 1));
        let s = Scale::new(7, 5);
        assert_eq!((s.step, s.top), (2, 8));
        let s = Scale::new(u64::MAX, 5);
        assert!(s.top >= u64::MAX / 2 && s.step > 0);
    }

    #[test]
    fn numbers_read_with_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
