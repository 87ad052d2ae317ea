//! `hutch replay ID [EXEC]`: plays an exec's session recording (asciicast v2, fetched from the
//! daemon) back in this terminal, at its own pace or scaled, with long pauses capped.

use std::time::Duration;

use clap::Args;
use hutch_journal::cast::{parse, CastEvent};
use hutch_types::SandboxId;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::{args::ConnArgs, error::CliError};

/// `hutch replay ID [EXEC] [--speed F] [--idle-limit S]`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Daemon connection.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Sandbox id.
    pub id: SandboxId,
    /// The exec: its id (`hutch.exec.id` in `hutch audit ID --kind exec`), the seq of its
    /// exec.start or exec.end record, or `latest`.
    #[arg(default_value = "latest")]
    pub exec: String,
    /// Play this many times faster (0.5: half as fast).
    #[arg(long, short = 's', default_value_t = 1.0, value_parser = positive)]
    pub speed: f64,
    /// Cap every pause at this many seconds (before scaling by --speed).
    #[arg(long, short = 'i', value_name = "SECS", value_parser = positive)]
    pub idle_limit: Option<f64>,
    /// Write the recording (asciicast v2) to stdout instead of playing it.
    #[arg(long)]
    pub raw: bool,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

/// Runs `hutch replay`.
pub async fn run(home: &hutch_daemon::Home, args: ReplayArgs) -> Result<i32, CliError> {
    let client = crate::remote::client(home, &args.conn);
    let cast = client.recording(args.id.as_str(), &args.exec).await?;
    let mut stdout = tokio::io::stdout();
    if args.raw {
        stdout.write_all(&cast).await.map_err(CliError::Io)?;
        stdout.flush().await.map_err(CliError::Io)?;
        return Ok(0);
    }
    let (_, events) = parse(&cast)?;
    play(&mut stdout, &events, &Pace::from(&args)).await?;
    Ok(0)
}

/// How fast to play.
#[derive(Debug, Clone, Copy)]
struct Pace {
    speed: f64,
    idle_limit: Option<f64>,
}

impl From<&ReplayArgs> for Pace {
    fn from(args: &ReplayArgs) -> Pace {
        Pace {
            speed: args.speed,
            idle_limit: args.idle_limit,
        }
    }
}

impl Pace {
    /// When each event is due, in seconds from the start of playing: gaps capped at the idle
    /// limit, then scaled by the speed (times that go back count as no gap).
    fn schedule(&self, events: &[CastEvent]) -> Vec<f64> {
        let mut last = 0.0;
        let mut due = 0.0;
        events
            .iter()
            .map(|CastEvent(t, _, _)| {
                let gap = (t - last).max(0.0);
                last = last.max(*t);
                due += self.idle_limit.map_or(gap, |l| gap.min(l)) / self.speed;
                due
            })
            .collect()
    }
}

/// Writes the output events to `out` as they fall due; a marker (a cut recording) is shown
/// on its own line.
async fn play<W: AsyncWrite + Unpin>(
    out: &mut W,
    events: &[CastEvent],
    pace: &Pace,
) -> Result<(), CliError> {
    let start = tokio::time::Instant::now();
    for (CastEvent(_, code, data), due) in events.iter().zip(pace.schedule(events)) {
        let text = match code.as_str() {
            "o" => data.clone(),
            // The label is ours, but escaped all the same.
            "m" => format!("\r\n[{}]\r\n", data.escape_debug()),
            _ => continue,
        };
        tokio::time::sleep_until(start + Duration::from_secs_f64(due)).await;
        out.write_all(text.as_bytes()).await.map_err(CliError::Io)?;
        out.flush().await.map_err(CliError::Io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, code: &str, data: &str) -> CastEvent {
        CastEvent(t, code.into(), data.into())
    }

    #[test]
    fn the_schedule_scales_by_speed_and_caps_pauses() {
        let events = [ev(0.5, "o", "a"), ev(10.5, "o", "b"), ev(11.0, "o", "c")];
        let real = Pace {
            speed: 1.0,
            idle_limit: None,
        };
        assert_eq!(real.schedule(&events), [0.5, 10.5, 11.0]);
        let fast = Pace {
            speed: 2.0,
            idle_limit: Some(1.0),
        };
        assert_eq!(fast.schedule(&events), [0.25, 0.75, 1.0]);
        // A time that goes back is no pause.
        assert_eq!(
            real.schedule(&[ev(2.0, "o", ""), ev(1.0, "o", "")]),
            [2.0, 2.0]
        );
    }

    #[tokio::test]
    async fn playing_writes_output_and_markers_in_order_and_skips_input_and_resizes() {
        let events = [
            ev(0.1, "o", "$ "),
            ev(0.2, "i", "ls\r"),
            ev(0.3, "r", "100x30"),
            ev(5.0, "o", "x\r\n"),
            ev(5.0, "m", "hutch: recording truncated at 9 bytes"),
        ];
        let pace = Pace {
            speed: 10.0,
            idle_limit: Some(0.5),
        };
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        play(&mut out, &events, &pace).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "$ x\r\n\r\n[hutch: recording truncated at 9 bytes]\r\n"
        );
        // (0.1 + 0.1 + 0.1 + 0.5, the pause capped) / 10: not the recording's five seconds.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(80) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
}
